"""Media input/output of the engine: MP4/PNG/latents with metadata, names, atomicity, loaders.

Everything is read back with independent readers (PyAV for MP4s, Pillow for PNGs, safetensors for
latents), never with the code under test alone. MP4 is lossy: frames are compared by mean absolute
error on smooth synthetic content (tolerances below, measured values in the comments).
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
from datetime import datetime
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from wan.engine import media_out
from wan.engine.media import (
    OutputOptions,
    load_image,
    load_video,
    read_metadata,
    remove_stale_temp_files,
    render_name,
    resize_video,
    sanitize_name_part,
    save_outputs,
    to_uint8_frames,
    write_image,
    write_video,
)

NOW = datetime(2025, 3, 4, 5, 6, 7)
STEM = "2025-03-04_05-06-07_seed42_a_cat"
# Mean |decoded - written| in uint8 steps for the smooth test clip at quality 8 (CRF 10). Measured:
# 2.44 (64x48, 32 frames); even lossless CRF 0 gives 2.30, the cost of the 8-bit limited-range
# YUV 4:2:0 round trip on these gradients. Swapped channels or a resize give errors of 20 and more.
MP4_MAE_TOL = 3.5
METADATA = {
    "prompt": "a cat",
    "negative_prompt": "色调艳丽，过曝，静态，细节模糊不清，字幕",
    "tricky": "a=b;c#d\\e\nnew line \"quoted\" 🎬",
    "seed": 42, "guidance": 5.0, "shift": 3.1415926535897931, "flag": True, "none": None,
    "loras": [{"name": "x", "weight": 0.8}], "nested": {"list": [1, 2.5, "三"]},
}


def smooth_frames(t: int = 32, h: int = 48, w: int = 64) -> np.ndarray:
    """[T, H, W, 3] uint8: slowly moving colour waves (compressible, so MP4 error stays small)."""
    ti, yi, xi = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    r = 128 + 90 * np.sin(2 * np.pi * (xi / (2 * w) + ti / t))
    g = 128 + 90 * np.cos(2 * np.pi * yi / h)
    b = 128 + 90 * np.sin(2 * np.pi * ((xi + yi) / (2 * (w + h)) - ti / t))
    return np.stack([r, g, b], -1).round().astype(np.uint8)


def probe_mp4(path) -> dict:
    """Stream facts and decoded frames [T, H, W, 3] of an MP4, read with PyAV."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
        return {"codec": s.codec_context.name, "pix_fmt": s.codec_context.pix_fmt, "width": s.width,
                "height": s.height, "fps": s.average_rate, "frames": frames, "metadata": dict(c.metadata)}


def top_level_boxes(path) -> list[str]:
    """The order of the MP4's top-level boxes (faststart puts moov before mdat)."""
    names, data = [], Path(path).read_bytes()
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        names.append(kind.decode("latin-1"))
        pos += size if size else len(data)
    return names


def options(tmp_path, **kw) -> OutputOptions:
    return OutputOptions(folder=str(tmp_path / "out"), **kw)


def listing(tmp_path) -> list[str]:
    folder = tmp_path / "out"
    return sorted(os.listdir(folder)) if folder.exists() else []


# ---------------------------------------------------------------------------------------------
# MP4


def test_mp4_written_and_read_back(tmp_path):
    frames = smooth_frames()
    paths = save_outputs(frames, 16, METADATA, options(tmp_path), seed=42, prompt="a cat", now=NOW)
    assert [p.name for p in paths] == [f"{STEM}.mp4", f"{STEM}.json"]
    info = probe_mp4(paths[0])
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    assert (info["width"], info["height"], info["fps"]) == (64, 48, 16)
    assert info["frames"].shape == frames.shape
    mae = np.abs(info["frames"].astype(np.int16) - frames).mean()
    assert mae <= MP4_MAE_TOL, mae
    boxes = top_level_boxes(paths[0])
    assert boxes.index("moov") < boxes.index("mdat"), boxes  # +faststart
    # x264 writes its settings into the stream: quality 8 is CRF 10, as the official Wan output
    assert b"crf=10.0" in paths[0].read_bytes()
    # the engine's own loader agrees with PyAV
    video, fps = load_video(paths[0])
    assert fps == 16.0 and video.shape == (3, 32, 48, 64) and video.dtype == torch.float32
    expected = torch.from_numpy(info["frames"]).permute(3, 0, 1, 2).float() / 255 * 2 - 1
    assert torch.allclose(video, expected, atol=1e-6)
    assert load_video(paths[0], max_frames=5)[0].shape == (3, 5, 48, 64)


def test_metadata_round_trips_exactly_through_every_file(tmp_path):
    big = dict(METADATA, long_prompt="长提示词 " * 30000)  # ~330 KB: beyond a command-line argument
    paths = save_outputs(smooth_frames(t=5), 16, big, options(tmp_path, save_latents=True), seed=42,
                         prompt="a cat", latents=torch.randn(16, 2, 6, 8), now=NOW)
    assert len(paths) == 3
    for path in paths:
        assert read_metadata(path) == big, path.name
    # independent readers: PyAV's comment tag, plain json, safetensors header
    assert json.loads(probe_mp4(paths[0])["metadata"]["comment"]) == big
    assert json.loads(paths[1].read_text(encoding="utf-8")) == big
    with safe_open(str(paths[2]), framework="pt") as f:
        assert json.loads(f.metadata()["wan_studio"]) == big


def test_odd_size_is_padded_not_resized(tmp_path):
    frames = smooth_frames(t=4, h=47, w=63)
    with pytest.warns(UserWarning, match="63x47 is odd"):
        path = write_video(frames, 16, tmp_path / "odd.mp4")
    info = probe_mp4(path)
    assert (info["width"], info["height"]) == (64, 48)
    assert np.abs(info["frames"][:, :47, :63].astype(np.int16) - frames).mean() <= MP4_MAE_TOL


# ---------------------------------------------------------------------------------------------
# PNG, latents, conversion


def test_single_frame_is_png_with_exact_pixels_and_metadata(tmp_path):
    frame = np.random.default_rng(0).integers(0, 256, (1, 48, 64, 3), dtype=np.uint8)
    paths = save_outputs(frame, 16, METADATA, options(tmp_path), seed=42, prompt="a cat", now=NOW)
    assert [p.name for p in paths] == [f"{STEM}.png", f"{STEM}.json"]
    with Image.open(paths[0]) as img:
        assert img.mode == "RGB"
        assert np.array_equal(np.asarray(img), frame[0])
        assert json.loads(img.text["wan_studio"]) == METADATA
    assert read_metadata(paths[0]) == read_metadata(paths[1]) == METADATA


def test_latents_file_round_trip(tmp_path):
    latents = torch.randn(16, 3, 6, 8).to(torch.bfloat16)
    paths = save_outputs(smooth_frames(t=9), 16, METADATA, options(tmp_path, save_latents=True,
                         sidecar_json=False), seed=42, prompt="a cat", latents=latents, now=NOW)
    assert [p.name for p in paths] == [f"{STEM}.mp4", f"{STEM}.latents.safetensors"]
    with safe_open(str(paths[1]), framework="pt") as f:
        back = f.get_tensor("latents")
    assert back.dtype == torch.bfloat16 and torch.equal(back, latents)
    with pytest.raises(ValueError, match="save_latents"):
        save_outputs(smooth_frames(t=9), 16, METADATA, options(tmp_path, save_latents=True), seed=1,
                     prompt="x", now=NOW)


def test_to_uint8_frames_matches_official_rounding():
    video = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 7).expand(3, 2, 1, 7)
    # video files: truncation, as Wan's save_video: -0.5 -> 63.75 -> 63, 0.0 -> 127.5 -> 127
    assert to_uint8_frames(video)[0, 0, :, 0].tolist() == [0, 0, 63, 127, 191, 255, 255]
    # one frame: torchvision save_image's +0.5: -0.5 -> 64, 0.0 -> 128, 0.5 -> 191.25 -> 191
    assert to_uint8_frames(video[:, :1])[0, 0, :, 0].tolist() == [0, 0, 64, 128, 191, 255, 255]
    rand = torch.rand(3, 4, 5, 6) * 2.4 - 1.2
    x = np.clip(rand.numpy(), np.float32(-1), np.float32(1))  # float32 throughout, as the reference
    ref = np.floor((x + np.float32(1)) / np.float32(2) * np.float32(255)).astype(np.uint8)
    got = to_uint8_frames(rand)
    assert got.shape == (4, 5, 6, 3) and got.dtype == np.uint8
    assert np.array_equal(got, ref.transpose(1, 2, 3, 0))
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        to_uint8_frames(torch.zeros(4, 2, 8, 8))


def test_frame_convention_is_enforced(tmp_path):
    with pytest.raises(ValueError, match="to_uint8_frames"):
        save_outputs(torch.zeros(3, 9, 48, 64), 16, {}, options(tmp_path), seed=1, prompt="x", now=NOW)
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Names


def test_never_overwrites(tmp_path):
    opts = options(tmp_path)
    first = save_outputs(smooth_frames(t=3), 16, {"run": 1}, opts, seed=42, prompt="a cat", now=NOW)
    second = save_outputs(smooth_frames(t=3), 16, {"run": 2}, opts, seed=42, prompt="a cat", now=NOW)
    assert [p.name for p in second] == [f"{STEM}_2.mp4", f"{STEM}_2.json"]
    assert read_metadata(first[0]) == {"run": 1} and read_metadata(second[0]) == {"run": 2}
    # a leftover companion file alone also moves the whole group on, keeping names paired
    (tmp_path / "out" / f"{STEM}_3.json").write_text("{}")
    third = save_outputs(smooth_frames(t=3), 16, {"run": 3}, opts, seed=42, prompt="a cat", now=NOW)
    assert [p.name for p in third] == [f"{STEM}_4.mp4", f"{STEM}_4.json"]
    assert (tmp_path / "out" / f"{STEM}_3.json").read_text() == "{}"
    # the explicit-path writers refuse an existing name and leave it untouched
    before = first[0].read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_video(smooth_frames(t=3), 16, first[0])
    assert first[0].read_bytes() == before
    assert not [n for n in listing(tmp_path) if n.startswith(".")]


@pytest.mark.parametrize("prompt, expected", [
    ("../../etc/passwd", "etcpasswd"),
    ("!!! /// ... \\\\ ??? ***", "untitled"),
    ("", "untitled"),
    ("..", "untitled"),
    ("A red fox, jumping over: the \"lazy\" dog!", "A_red_fox_jumping_over_the_lazy_dog"),
    ("一只可爱的小猫 in the snow", "一只可爱的小猫_in_the_snow"),
    ("x" * 100, "x" * 40),
    ("tab\tand\nnewline\x00nul", "tab_and_newlinenul"),
])
def test_prompt_sanitising(prompt, expected):
    assert sanitize_name_part(prompt) == expected


def test_saved_names_stay_in_the_folder(tmp_path):
    for prompt in ("../../etc/passwd", "/abs/path", "..\\..\\win", "%*:|<>"):
        paths = save_outputs(smooth_frames(t=1), 16, {}, options(tmp_path), seed=3, prompt=prompt, now=NOW)
        for p in paths:
            assert p.parent == tmp_path / "out" and ".." not in p.name and not p.name.startswith(".")
    stem = render_name("{model}-{task}_{seed}", now=NOW, seed=-1, prompt="", model="wan2.1/t2v 14B",
                       task="t2v")
    assert stem == "wan21t2v_14B-t2v_-1"


@pytest.mark.parametrize("template, message", [
    ("{time}/{seed}", "characters"),
    ("{unknown}", "unknown field"),
    ("{seed.__class__}", "unknown field"),
    ("{seed[0]}", "unknown field"),
    ("{time", "malformed"),
    ("", "non-empty"),
])
def test_bad_templates_are_rejected(template, message):
    with pytest.raises(ValueError, match=message):
        OutputOptions(name_template=template)


@pytest.mark.parametrize("field, value", [("video_quality", 11), ("video_quality", -1),
                                          ("trim_tail_frames", -1), ("trim_tail_frames", 1.5)])
def test_bad_options_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        OutputOptions(**{field: value})


def test_parallel_saves_get_distinct_names(tmp_path):
    opts, n = options(tmp_path), 6
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def worker(i):
        try:
            barrier.wait()
            results[i] = save_outputs(smooth_frames(t=3, h=16, w=16), 16, {"worker": i}, opts, seed=42,
                                      prompt="a cat", now=NOW)
        except Exception as e:  # noqa: BLE001 - any failure is reported by the main thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    videos = [r[0] for r in results]
    assert len({p.name for p in videos}) == n
    for i, (video, sidecar) in enumerate(results):
        assert video.stem == sidecar.stem  # each group kept its names together
        assert read_metadata(video) == read_metadata(sidecar) == {"worker": i}
    assert len(listing(tmp_path)) == 2 * n  # no temps, no placeholders


def test_without_hard_links_the_fallback_still_never_overwrites(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EPERM, "hard links not supported", str(dst))

    monkeypatch.setattr(media_out.os, "link", no_link)
    opts = options(tmp_path)
    a = save_outputs(smooth_frames(t=3), 16, {"run": 1}, opts, seed=42, prompt="a cat", now=NOW)
    b = save_outputs(smooth_frames(t=3), 16, {"run": 2}, opts, seed=42, prompt="a cat", now=NOW)
    assert [p.name for p in b] == [f"{STEM}_2.mp4", f"{STEM}_2.json"]
    assert read_metadata(a[0]) == {"run": 1} and read_metadata(b[0]) == {"run": 2}
    assert len(listing(tmp_path)) == 4


# ---------------------------------------------------------------------------------------------
# Atomicity


def test_failure_midway_through_encoding_leaves_nothing(tmp_path, monkeypatch):
    real = media_out._frame_bytes

    def failing(frames):
        for i, chunk in enumerate(real(frames)):
            if i == 5:
                # ffmpeg is running and its partial output exists, under a dot-tmp name only
                names = listing(tmp_path)
                assert len(names) == 1 and names[0].startswith(f".{STEM}.mp4.") and names[0].endswith(".tmp")
                raise RuntimeError("simulated encoder failure")
            yield chunk

    monkeypatch.setattr(media_out, "_frame_bytes", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        save_outputs(smooth_frames(t=16), 16, METADATA, options(tmp_path), seed=42, prompt="a cat", now=NOW)
    assert listing(tmp_path) == []


def test_ffmpeg_error_is_reported_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(media_out, "crf_for_quality", lambda q: "not-a-number")  # ffmpeg refuses it
    with pytest.raises(RuntimeError, match=r"ffmpeg failed \(exit"):
        save_outputs(smooth_frames(t=4), 16, {}, options(tmp_path), seed=42, prompt="a cat", now=NOW)
    assert listing(tmp_path) == []


def test_failure_in_a_later_file_removes_the_earlier_ones(tmp_path, monkeypatch):
    def broken(latents, dest, text=None):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(media_out, "encode_latents", broken)
    with pytest.raises(OSError, match="disk full"):
        save_outputs(smooth_frames(t=4), 16, {}, options(tmp_path, save_latents=True), seed=42,
                     prompt="a cat", latents=torch.zeros(2, 2), now=NOW)
    assert listing(tmp_path) == []


def test_bad_metadata_is_refused_before_writing(tmp_path):
    for bad, where in [({"x": np.float32(1)}, r"metadata\['x'\]"), ({"x": [float("nan")]}, "NaN"),
                       ({1: "a"}, "keys must be str")]:
        with pytest.raises((TypeError, ValueError), match=where):
            save_outputs(smooth_frames(t=2), 16, bad, options(tmp_path), seed=1, prompt="x", now=NOW)
    assert listing(tmp_path) == []


def test_remove_stale_temp_files(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    stale = folder / ".a.mp4.0123456789ab.tmp"
    fresh = folder / ".b.mp4.ba9876543210.tmp"
    foreign = folder / ".other.tmp"
    for p in (stale, fresh, foreign):
        p.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    os.utime(foreign, (old, old))
    assert remove_stale_temp_files(folder) == [stale]
    assert sorted(os.listdir(folder)) == sorted([fresh.name, foreign.name])
    assert remove_stale_temp_files(tmp_path / "missing") == []


# ---------------------------------------------------------------------------------------------
# Trimming


def test_trim_tail_frames(tmp_path):
    frames = smooth_frames(t=12)
    mp4 = save_outputs(frames, 16, {}, options(tmp_path, trim_tail_frames=3), seed=1, prompt="t", now=NOW)[0]
    decoded = probe_mp4(mp4)["frames"]
    assert decoded.shape[0] == 9
    assert np.abs(decoded.astype(np.int16) - frames[:9]).mean() <= MP4_MAE_TOL
    png = save_outputs(frames, 16, {}, options(tmp_path, trim_tail_frames=11), seed=2, prompt="t", now=NOW)[0]
    with Image.open(png) as img:
        assert np.array_equal(np.asarray(img), frames[0])
    before = listing(tmp_path)
    with pytest.raises(ValueError, match="trim_tail_frames=12 would leave 0 of 12"):
        save_outputs(frames, 16, {}, options(tmp_path, trim_tail_frames=12), seed=3, prompt="t", now=NOW)
    assert listing(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Reading metadata: errors


def test_read_metadata_errors_name_the_file(tmp_path):
    bare = write_video(smooth_frames(t=2), 16, tmp_path / "bare.mp4")
    with pytest.raises(ValueError, match=r"bare\.mp4: no Wan Studio metadata"):
        read_metadata(bare)
    png = write_image(smooth_frames(t=1)[0], tmp_path / "bare.png")
    with pytest.raises(ValueError, match=r"bare\.png: no Wan Studio metadata"):
        read_metadata(png)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list\.json.*expected an object"):
        read_metadata(tmp_path / "list.json")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match=r"junk\.mp4: cannot read metadata"):
        read_metadata(tmp_path / "junk.mp4")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_metadata(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="nothing.mp4"):
        read_metadata(tmp_path / "nothing.mp4")


# ---------------------------------------------------------------------------------------------
# Input side


def _unit(values) -> torch.Tensor:
    """uint8 values -> [-1, 1] with the official order of operations (to_tensor, sub 0.5, div 0.5)."""
    return torch.as_tensor(np.asarray(values), dtype=torch.float32).div(255).sub(0.5).div(0.5)


def test_load_image_converts_modes(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (12, 10, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    img = load_image(tmp_path / "rgba.png")
    assert img.shape == (3, 12, 10) and img.dtype == torch.float32
    assert torch.equal(img, _unit(rgba[..., :3]).permute(2, 0, 1))  # alpha dropped, not composited

    grey = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    img = load_image(tmp_path / "grey.png")
    assert img.shape == (3, 12, 10) and all(torch.equal(img[c], _unit(grey)) for c in range(3))

    palette = Image.frombytes("P", (10, 12), rng.integers(0, 4, (12, 10), dtype=np.uint8).tobytes())
    colours = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]
    palette.putpalette(colours + [0] * (768 - len(colours)))
    palette.info["transparency"] = 0
    palette.save(tmp_path / "pal.png")
    expected = np.asarray(colours, np.uint8).reshape(4, 3)[np.asarray(palette)]
    assert torch.equal(load_image(tmp_path / "pal.png"), _unit(expected).permute(2, 0, 1))

    deep = (np.arange(120, dtype=np.uint16).reshape(12, 10) * 500)
    Image.fromarray(deep).save(tmp_path / "grey16.png")
    img = load_image(tmp_path / "grey16.png")
    assert torch.allclose(img[0], torch.from_numpy(deep / 65535.0 * 2 - 1).float(), atol=1e-6)


def test_load_image_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ValueError, match="corrupt.png"):
        load_image(tmp_path / "corrupt.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(tmp_path / "truncated.png")
    with pytest.raises(ValueError, match="not a file"):
        load_image(tmp_path)


def test_load_video_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        load_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(os.urandom(2000))
    with pytest.raises(ValueError, match="junk.mp4"):
        load_video(tmp_path / "junk.mp4")
    with pytest.raises(ValueError, match="max_frames"):
        load_video(tmp_path / "junk.mp4", max_frames=0)


def test_resize_video_matches_the_official_image_resize():
    video = torch.rand(3, 4, 20, 30) * 2 - 1
    out = resize_video(video, 16, 24)
    assert out.shape == (3, 4, 16, 24)
    for t in range(4):  # the official i2v call, one frame at a time
        ref = torch.nn.functional.interpolate(video[:, t][None], size=(16, 24), mode="bicubic")[0]
        assert torch.equal(out[:, t], ref)
    image = resize_video(video[:, 0], 10, 15, mode="area")  # [3, H, W] in, [3, h, w] out
    assert torch.allclose(image, video[:, 0].reshape(3, 10, 2, 15, 2).mean((2, 4)), atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        resize_video(video, 8, 8, mode="lanczos")


# ---------------------------------------------------------------------------------------------
# The output folder as the app lists it (its "every output" gallery sends what it lists)


def test_the_output_folder_listing_never_follows_a_link(tmp_path):
    from types import SimpleNamespace

    from wan.app.ui_gallery import folder_outputs

    out, private = tmp_path / "outputs", tmp_path / "state"
    out.mkdir()
    private.mkdir()
    (private / "queue.json").write_text('{"jobs": [{"prompt": "a secret"}]}')
    (out / "video.mp4").write_bytes(b"mp4")
    (out / "queue.mp4").symlink_to(private / "queue.json")  # a link out of the folder, with a shown suffix
    (out / "again.png").symlink_to(out / "video.mp4")        # a link inside it: not followed either
    (out / "loop.mp4").symlink_to(out / "loop.mp4")
    (out / "folder.mp4").mkdir()
    assert folder_outputs(SimpleNamespace(output_dir=out)) == [str(out / "video.mp4")]
    alias = tmp_path / "alias"  # an output folder configured as a link is listed at its real place
    alias.symlink_to(out)
    assert folder_outputs(SimpleNamespace(output_dir=alias)) == [str(out / "video.mp4")]


def test_continue_this_video_takes_a_video_of_a_task_that_can_continue(tmp_path):
    """The gallery's "Continue this video": the output's settings with the video to continue set;
    an image, a video without settings and a task that cannot continue are refused in words."""
    from wan.app.ui_gallery import continuation_of
    from wan.engine.engine import METADATA_KEY
    from wan.engine.request import GenerationRequest

    def output(task: str | None, frames=smooth_frames(t=5)):
        meta = {} if task is None else {METADATA_KEY: 1, "request": GenerationRequest(
            model="test-tiny-t2v", task=task, prompt=f"a {task}", seed=4).to_dict()}
        return str(save_outputs(frames, 16, meta, options(tmp_path), seed=4, prompt=f"a {task}", now=NOW)[0])
    made = output("t2v")
    request, said = continuation_of(made)
    assert request.continue_video == made and request.prompt == "a t2v" and request.seed == 4
    assert "video to continue" in said
    assert continuation_of(None)[0] is None and continuation_of(output("t2v", smooth_frames(t=1)))[1].startswith(
        "⚠️ select a video in the gallery first")
    request, said = continuation_of(output("v2v"))
    assert request is None and "task v2v, which cannot continue a video" in said and "can: t2v, ti2v, i2v, flf2v" in said
    request, said = continuation_of(output(None))
    assert request is None and "holds no Wan Studio settings" in said
