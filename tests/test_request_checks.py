"""Every request field is checked at submit, strictly, on the resolved request (issue 11, items 5, 6
and 9): the probe's values that used to pass submit and fail after sampling, or run, are refused
before anything loads, with the field named and the value cut short."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wan.cli_generate import parse_prompt_line
from wan.engine.request import GenerationRequest, LoraChoice, RequestError, resolve_request
from wan.engine.request_checks import Limits

ROOT = Path(__file__).resolve().parent.parent
BASE = dict(model="test-tiny-t2v", prompt="a fox", steps=4)


@pytest.mark.parametrize("changes, field", [
    (dict(guidance=float("nan")), "guidance"),
    (dict(guidance=float("inf")), "guidance"),
    (dict(guidance=1e9), "guidance"),
    (dict(model="test-tiny-vace", task="vace", ref_images=["r.png"], vace_scale=float("nan")), "vace_scale"),
    (dict(fps=10**9), "fps"),
    (dict(fps=1e9), "fps"),
    (dict(trim_tail=0.5), "trim_tail"),
    (dict(seed="x"), "seed"),
    (dict(loras="abc"), "loras"),
    (dict(prompt=None), "prompt"),
    (dict(save_latents="no"), "save_latents"),
    (dict(save_latents=1), "save_latents"),
    (dict(cpu_noise="yes"), "cpu_noise"),
    (dict(nag_scale=float("nan")), "nag_scale"),
    (dict(nag_scale=0.5), "nag_scale"),
    (dict(nag_scale=1e9), "nag_scale"),
    (dict(nag_tau="2.5"), "nag_tau"),
    (dict(nag_tau=0.0), "nag_tau"),
    (dict(nag_alpha=-0.1), "nag_alpha"),
    (dict(nag_alpha=None), "nag_alpha"),
    (dict(steps=4.0), "steps"),
    (dict(steps=True), "steps"),
    (dict(width="832"), "width"),
    (dict(ref_images="r.png"), "ref_images"),
    (dict(profile_overrides=["a"]), "profile_overrides"),
    (dict(profile_overrides={"vae.tile_px": float("nan")}), "profile_overrides"),
    (dict(shift=-1.0), "shift"),
    (dict(negative_prompt="a\x00b"), "negative_prompt"),
    (dict(name_template="{prompt!r}"), "name_template"),
    (dict(output_dir=3), "output_dir"),
])
def test_bad_values_are_refused_at_submit_naming_the_field(changes, field):
    with pytest.raises(RequestError) as e:
        resolve_request(GenerationRequest(**{**BASE, **changes}), check_files=False)
    assert e.value.field == field, str(e.value)


def test_from_dict_refuses_shapes_with_a_request_error():
    for data, field in (([1, 2], "request"), ({"prompt": "x"}, "model"), ({"model": "m", "nope": 1}, "nope"),
                        ({"model": "m", "loras": [{"file": "x"}]}, "loras"),
                        ({"model": "m", "loras": ["abc"]}, "loras")):
        with pytest.raises(RequestError) as e:
            GenerationRequest.from_dict(data)
        assert e.value.field == field
    # a string is not silently split into a list of characters
    req = GenerationRequest.from_dict({"model": "test-tiny-vace", "task": "vace", "ref_images": "abc"})
    with pytest.raises(RequestError, match="ref_images"):
        resolve_request(req, check_files=False)


def test_a_refused_value_is_echoed_cut_short():
    with pytest.raises(RequestError) as e:
        resolve_request(GenerationRequest(**{**BASE, "prompt": "x" * 1_000_000}), check_files=False)
    assert e.value.field == "prompt" and len(str(e.value)) < 400 and "1000002 characters" in str(e.value)


def test_limits_can_be_raised_for_people_who_mean_it():
    req = GenerationRequest(**{**BASE, "steps": 300})
    with pytest.raises(RequestError, match="at most 200 steps"):
        resolve_request(req)
    resolved, _ = resolve_request(req, limits=Limits(max_steps=500))
    assert resolved.steps == 300


def test_the_cli_refuses_a_billion_steps_at_once(tmp_path):
    """--steps 1000000000 grew to 23.9 GB before; now exit 2 before any model loads, and a flag
    raises the limit."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "wgp.py"), "generate", "--model", "test-tiny-t2v", "--prompt",
                        "x", "--steps", "1000000000", "--checkpoint_dir", str(tmp_path / "none")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "steps" in r.stderr and "--max_steps" in r.stderr
    assert time.monotonic() - t0 < 60 and not (tmp_path / "none").exists()  # nothing was loaded or made
    r = subprocess.run([sys.executable, str(ROOT / "wgp.py"), "generate", "--model", "test-tiny-t2v", "--prompt",
                        "x", "--max_steps", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "max_steps" in r.stderr


def test_a_prompt_line_of_options_alone_is_a_broken_line():
    base = GenerationRequest(**BASE)
    with pytest.raises(RequestError, match="prompt"):
        parse_prompt_line("--w 64", base)
    assert parse_prompt_line("a cat --w 96", base).prompt == "a cat"
    assert parse_prompt_line("a cat --w 96", base).width == 96


def test_loras_are_checked_item_by_item():
    with pytest.raises(RequestError, match="loras"):
        resolve_request(GenerationRequest(**BASE, loras=[LoraChoice("a", 1.0)]), check_files=False)
    with pytest.raises(RequestError, match="loras"):
        resolve_request(GenerationRequest(**BASE, loras=[LoraChoice("a", "1", include="x")]), check_files=False)


def test_input_files_are_checked_from_their_headers_at_submit(tmp_path):
    """Item 4: an input's resolution and length are checked when the request is submitted, from
    the file's header (nothing decoded): too large, too short, or not a video at all."""
    import av
    import numpy as np
    from PIL import Image
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(tmp_path / "big.png")
    clip = tmp_path / "short.mp4"
    with av.open(str(clip), "w") as out:
        s = out.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for _ in range(5):
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")))
        out.mux(s.encode())
    (tmp_path / "fake.mp4").write_bytes(b"not a video at all")
    i2v = GenerationRequest(model="test-tiny-i2v", task="i2v", prompt="x", image=str(tmp_path / "big.png"))
    resolve_request(i2v)
    with pytest.raises(RequestError, match="at most 6000 pixels per frame; this one is 96x64") as e:
        resolve_request(i2v, limits=Limits(max_input_pixels=6000))
    assert e.value.field == "image"
    v2v = GenerationRequest(model="test-tiny-t2v", task="v2v", prompt="x", video=str(clip), frames=9)
    with pytest.raises(RequestError, match="at least 9 frames .* it has 5"):
        resolve_request(v2v)
    resolve_request(v2v.replace(frames=5))
    with pytest.raises(RequestError, match="a readable video file") as e:
        resolve_request(v2v.replace(video=str(tmp_path / "fake.mp4"), frames=5))
    assert e.value.field == "video"
