"""Every task through the real CLI on the TEST family, and the CLI's answers to bad input.

Outputs are read back with PyAV, independently of the project's own reader: frame count, size,
fps and codec. The metadata embedded in each output rebuilds the resolved request, and running
that request again reproduces the decoded frames exactly.
"""

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from wan.engine import Engine, request_from_metadata, resolve_request
from wan.engine.media import read_metadata
from wan.testing.tiny_family import ensure_tiny_checkpoints

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Input files: two images and three short videos (9 frames, and a 5-frame one that is too short)."""
    d = tmp_path_factory.mktemp("inputs")
    g = np.random.default_rng(0)
    for name, (w, h) in {"start.png": (96, 64), "end.png": (80, 64), "ref.png": (48, 64)}.items():
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / name)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for name, n in {"clip.mp4": 9, "mask.mp4": 9, "short.mp4": 5}.items():
        write_video(d / name, [g.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(n)])
    return d


def write_video(path, frames, fps=16):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())


def read_video(path):
    """(frames [T, H, W, 3] uint8, fps, codec) read with PyAV."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
        return frames, float(s.average_rate), s.codec_context.name


def wgp(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    return subprocess.run([sys.executable, str(ROOT / "wgp.py"), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=300)


CASES = {  # name -> (arguments, expected (frames, width, height))
    "t2v": (["--model", "test-tiny-t2v"], (9, 64, 64)),
    "t2i": (["--model", "test-tiny-t2v", "--task", "t2i"], (1, 64, 64)),
    "i2v": (["--model", "test-tiny-i2v", "--image", "{start.png}"], (9, 64, 48)),
    "flf2v": (["--model", "test-tiny-flf2v", "--image", "{start.png}", "--end_image", "{end.png}"], (9, 64, 48)),
    "v2v": (["--model", "test-tiny-t2v", "--task", "v2v", "--video", "{clip.mp4}", "--strength", "0.6"], (9, 64, 64)),
    "fun_inp": (["--model", "test-tiny-fun-inp", "--image", "{start.png}", "--end_image", "{end.png}"], (9, 64, 48)),
    "fun_control": (["--model", "test-tiny-fun-control", "--control_video", "{clip.mp4}", "--image", "{ref.png}"],
                    (9, 64, 64)),
    "vace": (["--model", "test-tiny-vace", "--control_video", "{clip.mp4}", "--mask_video", "{mask.mp4}",
              "--ref_images", "{ref.png}"], (9, 64, 64)),
    "ti2v": (["--model", "test-tiny-ti2v", "--image", "{start.png}", "--trim_tail", "4"], (5, 64, 64)),
    "a14b": (["--model", "test-tiny-t2v-a14b", "--video_size", "64", "96"], (9, 96, 64)),
    "i2v_a14b": (["--model", "test-tiny-i2v-a14b", "--image", "{start.png}"], (9, 64, 48)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_task_through_the_cli(case, ckpts, inputs, tmp_path):
    args, (frames, width, height) = CASES[case]
    args = [inputs / a[1:-1] if a.startswith("{") else a for a in args]  # "{name}": an input file
    out = tmp_path / "out"
    r = wgp("generate", *args, "--prompt", f"a test of {case}", "--seed", "5", "--checkpoint_dir", ckpts,
            "--output_dir", out, "--quiet")
    assert r.returncode == 0, r.stderr
    written = [Path(line) for line in r.stdout.split()]
    media = [p for p in written if p.suffix in (".mp4", ".png")]
    assert len(media) == 1 and media[0].exists()
    path = media[0]
    if frames == 1:
        assert path.suffix == ".png"
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape == (height, width, 3)
        decoded = pixels[None]
    else:
        decoded, fps, codec = read_video(path)
        assert (decoded.shape, fps, codec) == ((frames, height, width, 3), 16.0, "h264")

    request = request_from_metadata(read_metadata(path))
    resolved, _ = resolve_request(request.replace(seed=request.seed))
    assert request == resolved and request.seed == 5 and request.prompt == f"a test of {case}"

    # the same request again (into another folder) gives the same frames
    again = Engine(checkpoint_dir=ckpts, device="cpu").generate(request.replace(output_dir=str(tmp_path / "again")))
    again_path = [p for p in again.files if p.suffix in (".mp4", ".png")][0]
    again_frames = np.asarray(Image.open(again_path).convert("RGB"))[None] if frames == 1 else read_video(again_path)[0]
    assert np.array_equal(decoded, again_frames)


def test_from_output_reproduces_a_file(ckpts, tmp_path):
    r = wgp("generate", "--model", "test-tiny-t2v", "--prompt", "a fox", "--checkpoint_dir", ckpts,
            "--output_dir", tmp_path / "a", "--quiet")
    first = [Path(p) for p in r.stdout.split() if p.endswith(".mp4")][0]
    r2 = wgp("generate", "--from_output", first, "--checkpoint_dir", ckpts, "--output_dir", tmp_path / "b", "--quiet")
    assert r2.returncode == 0, r2.stderr
    second = [Path(p) for p in r2.stdout.split() if p.endswith(".mp4")][0]
    assert second.parent == tmp_path / "b"
    assert np.array_equal(read_video(first)[0], read_video(second)[0])


BAD = {
    "unknown model": (["--model", "wan9-nope"], "model: 'wan9-nope'"),
    "missing image": (["--model", "test-tiny-i2v"], "image: None"),
    "unreadable image": (["--model", "test-tiny-i2v", "--image", "{broken.png}"], "image: "),
    "absent image file": (["--model", "test-tiny-i2v", "--image", "nope.png"], "existing, readable file"),
    "short control video": (["--model", "test-tiny-fun-control", "--control_video", "{short.mp4}"],
                            "at least 9 frames"),
    "size not a multiple": (["--model", "test-tiny-t2v", "--width", "72", "--height", "64"], "multiple of 16"),
    "frames not 4k+1": (["--model", "test-tiny-t2v", "--frames", "8"], "4k+1"),
    "steps <= 0": (["--model", "test-tiny-t2v", "--steps", "0"], "steps: 0"),
    "unknown sampler": (["--model", "test-tiny-t2v", "--sampler", "ddim"], "sampler: 'ddim'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exit_2_with_a_named_field(case, ckpts, inputs, tmp_path):
    args, expected = BAD[case]
    args = [inputs / a[1:-1] if a.startswith("{") else a for a in args]  # "{name}": an input file
    r = wgp("generate", *args, "--prompt", "x", "--checkpoint_dir", ckpts, "--output_dir", tmp_path / "out", "--quiet")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert expected in r.stderr
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").iterdir() if p.suffix == ".mp4"]


def test_prompt_file_with_a_broken_line_runs_the_others(ckpts, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\n\na fox --s 2 --d 1\na cat --w abc\na bird --s 2 --f 5 --d 2\n", encoding="utf-8")
    r = wgp("generate", "--model", "test-tiny-t2v", "--from_file", prompts, "--checkpoint_dir", ckpts,
            "--output_dir", tmp_path / "out", "--quiet")
    assert r.returncode == 2
    assert "line 4: --w: 'abc'" in r.stderr and "Traceback" not in r.stderr
    videos = sorted((tmp_path / "out").glob("*.mp4"))
    assert len(videos) == 2
    assert sorted(read_video(v)[0].shape[0] for v in videos) == [5, 9]


def test_interactive_mode_reads_prompts_until_an_empty_line(ckpts, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(ROOT / "wgp.py"), "generate", "--model", "test-tiny-t2v", "--interactive",
                        "--checkpoint_dir", str(ckpts), "--output_dir", str(tmp_path), "--quiet"],
                       input="a fox --s 2 --f 5\na cat --w 33\n\nnot read\n", capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr  # the second prompt's width is refused, the first one is made
    assert "width: 33" in r.stderr and "Traceback" not in r.stderr
    assert len(list(tmp_path.glob("*.mp4"))) == 1


def test_inline_options_map_to_request_fields():
    from wan.cli_generate import parse_prompt_line
    from wan.engine import GenerationRequest
    base = GenerationRequest(model="test-tiny-t2v")
    r = parse_prompt_line("a fox in snow --w 96 --h 64 --f 5 --d 7 --s 3 --g 4.5 --fs 3 --n ugly blur --i a.png", base)
    assert (r.prompt, r.width, r.height, r.frames, r.seed, r.steps, r.guidance, r.shift, r.negative_prompt, r.image) == (
        "a fox in snow", 96, 64, 5, 7, 3, 4.5, 3.0, "ugly blur", "a.png")
    assert parse_prompt_line("x --l 2", base).guidance == 2.0
    assert parse_prompt_line("x --ei b.png --cn c.mp4", base).control_video == "c.mp4"
