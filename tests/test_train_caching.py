"""Caching for training (wan/train/caching.py, media_frames.py, cli_cache.py) on the TEST family: the
files musubi-tuner would write for a dataset of two tiny videos and two images, with latents checked
against ``vae.encode`` of pixels prepared by hand here (Pillow resize and crop), text caches against
the encoder's trimmed output, i2v and control parts, reuse and redo, stale files, and the commands."""

import argparse
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import wan
from wan.cli_cache import (add_cache_latents_arguments, add_cache_text_encoder_arguments, add_dataset_check_arguments,
                           run_cache_latents, run_cache_text_encoder_outputs, run_dataset_check)
from wan.models.vae_tiling import TileConfig
from wan.testing.tiny_family import ensure_tiny_checkpoints
from wan.train.cache_files import i2v_mask, read_latent_cache, read_text_cache
from wan.train.caching import cache_latents, cache_text_encoder_outputs, dataset_check_report
from wan.train.dataset_config import load_dataset_config
from wan.train.frames import kept_frame_indices
from wan.train.media_frames import area_resize, read_video_frames, resize_to_bucket, target_indices

# Every latent file the dataset below gives at resolution 32x32, target_frames [1, 9]: videos are named
# after their bucket (a.mp4 is 48x32, cropped to 32x32), images after their own size.
LATENT_FILES = {"vid": ["a_00000-001_0032x0032_wan.safetensors", "a_00000-009_0032x0032_wan.safetensors",
                        "b_00000-001_0032x0032_wan.safetensors", "b_00000-009_0032x0032_wan.safetensors"],
                "img": ["c_0040x0024_wan.safetensors", "d_0064x0064_wan.safetensors"]}
TEXT_FILES = {"vid": ["a_wan_te.safetensors", "b_wan_te.safetensors"],
              "img": ["c_wan_te.safetensors", "d_wan_te.safetensors"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    ensure_tiny_checkpoints(root)
    return root


@pytest.fixture(scope="module")
def models(tiny):
    t = tiny / "tiny"
    return {"vae": wan.load_vae(t / "vae_2.1.safetensors", dtype=torch.float32),
            "te": wan.load_text_encoder(t / "umt5.safetensors", tokenizer=t / "tokenizer"),
            "clip": wan.load_clip(t / "clip.safetensors")}


def _video(path: Path, frames: int, size, seed: int):
    """A video of smooth random frames (mpeg4 at high quality, so the content survives)."""
    g = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=16, options={"qscale": "2"})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for _ in range(frames):
            pixels = g.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def _image(path: Path, size, seed: int):
    g = np.random.default_rng(seed)
    Image.fromarray(g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


TOML = """
[general]
resolution = {resolution}
caption_extension = ".txt"
batch_size = 2
enable_bucket = true

[[datasets]]
video_directory = "vid"
cache_directory = "cache_vid"
target_frames = {frames}
{video_extra}
[[datasets]]
image_directory = "img"
cache_directory = "cache_img"
"""


def _config(folder: Path, resolution="32", frames="[1, 9]", video_extra=""):
    (folder / "d.toml").write_text(TOML.format(resolution=resolution, frames=frames, video_extra=video_extra))
    return load_dataset_config(folder / "d.toml", base_dir=folder)


@pytest.fixture
def data(tmp_path):
    (tmp_path / "vid").mkdir()
    (tmp_path / "img").mkdir()
    _video(tmp_path / "vid" / "a.mp4", 17, (48, 32), seed=1)
    _video(tmp_path / "vid" / "b.mp4", 9, (32, 32), seed=2)
    _image(tmp_path / "img" / "c.png", (40, 24), seed=3)
    _image(tmp_path / "img" / "d.png", (64, 64), seed=4)
    for name, text in {"vid/a": "a red fox", "vid/b": "  snow   falling ", "img/c": "a cat", "img/d": "a dog"}.items():
        (tmp_path / f"{name}.txt").write_text(text)
    return tmp_path


def _names(folder: Path, suffix="_wan.safetensors"):
    return sorted(p.name for p in folder.glob(f"*{suffix}"))


def _unit(pixels: np.ndarray) -> torch.Tensor:
    """[F, H, W, 3] uint8 -> [1, 3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(pixels).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


def _mtimes(*folders):
    return {p: p.stat().st_mtime_ns for f in folders for p in f.glob("*.safetensors")}


# ----------------------------------------------------------------------------- pixels


def test_area_resize_averages_the_covered_area():
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    half = area_resize(pixels, (3, 2))  # 2x2 blocks, rounded half up as OpenCV does
    expected = (pixels.reshape(2, 2, 3, 2, 3).astype(int).sum(axis=(1, 3)) + 2) >> 2
    assert np.array_equal(half, expected)
    row = np.array([[0, 30, 60]], np.uint8)  # 3 -> 2: each output covers 1.5 input pixels
    assert area_resize(row, (2, 1)).tolist() == [[10, 50]]  # (0 + 30/2) / 1.5, (30/2 + 60) / 1.5
    assert np.array_equal(area_resize(pixels, (6, 4)), pixels)


def test_area_resize_matches_opencv():
    import cv2  # a test dependency: the resize musubi-tuner calls
    g = np.random.default_rng(0)
    for _ in range(50):
        h, w = g.integers(8, 60, 2)
        pixels = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        size = (int(g.integers(1, w + 1)), int(g.integers(1, h + 1)))
        assert np.array_equal(area_resize(pixels, size), cv2.resize(pixels, size, interpolation=cv2.INTER_AREA))


def test_resize_to_bucket_scales_to_cover_then_crops_the_centre():
    g = np.random.default_rng(5)
    image = Image.fromarray(g.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    # up: x 32/24 -> 53x32 by Lanczos, crop 10 px left
    expected = np.array(image.resize((53, 32), Image.LANCZOS))[:, 10:42]
    assert np.array_equal(resize_to_bucket(image, (32, 32)), expected)
    # down: 48x32 -> scale 1 (the height already fits): no resampling, crop 8 px left
    frame = g.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    assert np.array_equal(resize_to_bucket(frame, (32, 32)), frame[:, 8:40])


def test_frame_dropping_for_source_fps_is_musubis_rule():
    for fps in (30.0, 24.0, 16.0, 10.0):
        it = target_indices(fps)
        kept = [i for i in (next(it) for _ in range(100)) if i is not None]
        assert kept == kept_frame_indices(100, fps)


def test_video_frames_follow_source_fps_and_stop_at_the_end(tmp_path):
    _video(tmp_path / "v.mp4", 30, (32, 32), seed=0)
    every, _ = read_video_frames(tmp_path / "v.mp4", lambda size: size)
    assert len(every) == 30
    halved, bucket = read_video_frames(tmp_path / "v.mp4", lambda size: size, end=9, source_fps=30.0)
    assert bucket == (32, 32) and len(halved) == 9  # 16 of each 30 frames kept, stopped at index 9
    source = [i for i, t in zip(range(30), target_indices(30.0)) if t is not None][:9]  # the frames kept
    assert all(np.array_equal(halved[k], every[s]) for k, s in enumerate(source))


# ----------------------------------------------------------------------------- latents


def test_latent_caches_have_musubis_names_and_the_vae_latents_of_the_bucket(data, models):
    vae = models["vae"]
    report = cache_latents(_config(data), vae)
    assert report.ok, report.lines()
    assert _names(data / "cache_vid") == LATENT_FILES["vid"] and _names(data / "cache_img") == LATENT_FILES["img"]
    # batches: per dataset batch_size 2, items of one bucket and frame count together
    assert report.encoder_calls == 3  # (a 1, b 1), (a 9, b 9), (c, d)

    # image c by hand: 40x24 -> cover 32x32 -> 53x32 Lanczos, centre crop
    c = np.array(Image.open(data / "img" / "c.png").resize((53, 32), Image.LANCZOS))[:, 10:42]
    cache = read_latent_cache(data / "cache_img" / "c_0040x0024_wan.safetensors")
    with torch.no_grad():
        expected = vae.encode(_unit(c[None]))[0]
    assert cache.latents.shape == (16, 1, 4, 4) and cache.latents.dtype == torch.float32
    torch.testing.assert_close(cache.latents, expected, atol=1e-5, rtol=1e-5)  # batched with d: float noise only
    assert cache.metadata == {"architecture": "wan", "width": "40", "height": "24", "format_version": "1.0.1"}

    # video a by hand: PyAV frames, 48x32 already covers 32x32: crop 8 px left, first 9 frames
    with av.open(str(data / "vid" / "a.mp4")) as container:
        frames = [np.array(f.to_image())[:, 8:40] for f in container.decode(video=0)][:9]
    cache = read_latent_cache(data / "cache_vid" / "a_00000-009_0032x0032_wan.safetensors")
    with torch.no_grad():
        expected = vae.encode(_unit(np.stack(frames)))[0]
    assert cache.latents.shape == (16, 3, 4, 4)
    torch.testing.assert_close(cache.latents, expected, atol=1e-5, rtol=1e-5)
    assert cache.metadata["frame_count"] == "9" and cache.original_size == (32, 32)
    assert cache.image_latents is None and cache.clip is None and cache.control_latents is None


def test_i2v_caches_hold_the_mask_the_first_frame_latents_and_clip(data, models):
    vae, clip = models["vae"], models["clip"]
    config = _config(data)
    report = cache_latents(config, vae, clip=clip, batch_size=1)
    assert report.ok and report.encoder_calls == 6  # --batch_size 1 splits every batch
    cache = read_latent_cache(data / "cache_vid" / "b_00000-009_0032x0032_wan.safetensors")
    assert set(cache.dtype_names) == {"latents", "latents_image", "clip"}
    assert cache.image_latents.shape == (20, 3, 4, 4)
    torch.testing.assert_close(cache.image_latents[:4], i2v_mask(9, 4, 4, torch.float32))
    frames, _ = read_video_frames(data / "vid" / "b.mp4", lambda size: size, end=9)
    first = _unit(np.stack(frames))[:, :, :1]
    with torch.no_grad():
        conditioning = torch.cat([first, torch.zeros(1, 3, 8, 32, 32)], dim=2)
        expected = vae.encode(conditioning)[0]
        features = clip(first[:, :, 0])[0]
    torch.testing.assert_close(cache.image_latents[4:], expected)
    assert cache.clip.dtype == torch.float16 and cache.clip.shape == features.shape == (17, 160)
    torch.testing.assert_close(cache.clip, features.half())
    again = cache_latents(config, vae, clip=clip, skip_existing=True)  # the TEST CLIP's 17x160 features fit too
    assert again.encoder_calls == 0 and len(again.reused) == 6
    # Wan 2.2 i2v: --i2v without CLIP; VAE tiling (images only, to keep the test short)
    (data / "d.toml").write_text(TOML.format(resolution=32, frames="[1]", video_extra="").split("[[datasets]]")[0]
                                 + '[[datasets]]\nimage_directory = "img"\ncache_directory = "cache_img"\n')
    tile = TileConfig(tile=24, overlap=8)  # 2x2 tiles over 32x32
    report = cache_latents(load_dataset_config(data / "d.toml", base_dir=data), vae, i2v=True, vae_tiling=tile)
    cache = read_latent_cache(data / "cache_img" / "d_0064x0064_wan.safetensors")
    assert report.ok and cache.clip is None and cache.image_latents.shape == (20, 1, 4, 4)
    d = area_resize(np.array(Image.open(data / "img" / "d.png")), (32, 32))
    with torch.no_grad():
        expected = vae.encode(_unit(d[None]), tile=tile)[0]
    torch.testing.assert_close(cache.latents, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.image_latents[4:], expected, atol=1e-5, rtol=1e-5)  # one frame: no padding


def test_control_videos_become_control_latents(data, models):
    vae = models["vae"]
    (data / "ctl").mkdir()
    _video(data / "ctl" / "a.mp4", 12, (48, 32), seed=9)  # shorter than a.mp4: its last frame repeats
    (data / "ctl" / "b").mkdir()  # a folder of frames
    for i in range(9):
        _image(data / "ctl" / "b" / f"{i:03d}.png", (32, 32), seed=20 + i)
    report = cache_latents(_config(data, video_extra='control_directory = "ctl"\n'), vae)
    assert report.ok, report.lines()
    cache = read_latent_cache(data / "cache_vid" / "b_00000-009_0032x0032_wan.safetensors")
    pngs = np.stack([np.array(Image.open(data / "ctl" / "b" / f"{i:03d}.png")) for i in range(9)])
    with torch.no_grad():
        torch.testing.assert_close(cache.control_latents, vae.encode(_unit(pngs))[0], atol=1e-5, rtol=1e-5)
    a = read_latent_cache(data / "cache_vid" / "a_00000-009_0032x0032_wan.safetensors")
    assert a.control_latents.shape == a.latents.shape == (16, 3, 4, 4)


def test_skip_existing_reuses_valid_caches_and_redoes_the_others(data, models):
    vae = models["vae"]
    cache_latents(_config(data), vae)
    before = _mtimes(data / "cache_vid", data / "cache_img")

    again = cache_latents(_config(data), vae, skip_existing=True)
    assert again.encoder_calls == 0 and len(again.reused) == 6 and not again.written
    assert _mtimes(data / "cache_vid", data / "cache_img") == before
    # musubi without --skip_existing: everything is made again
    assert len(cache_latents(_config(data), vae).written) == 6

    # another resolution: images keep their names (their own size) but no longer fit; videos get new names
    report = cache_latents(_config(data, resolution="16"), vae, skip_existing=True)
    assert report.ok and not report.reused
    assert {p.name: why for p, why in report.redone} == {
        "c_0040x0024_wan.safetensors": "latents are for 32x32, the bucket is 16x16",
        "d_0064x0064_wan.safetensors": "latents are for 32x32, the bucket is 16x16"}
    assert _names(data / "cache_vid") == [n.replace("0032x0032", "0016x0016") for n in LATENT_FILES["vid"]]
    assert sorted(p.name for p in report.removed) == LATENT_FILES["vid"]

    # other target_frames: the 9-frame windows are stale; with keep_cache they stay
    report = cache_latents(_config(data, resolution="16", frames="[1, 5]"), vae, skip_existing=True,
                           keep_cache=True)
    assert len(report.reused) == 4 and len(report.written) == 2 and not report.removed
    assert sorted(p.name for p in report.kept) == ["a_00000-009_0016x0016_wan.safetensors",
                                                   "b_00000-009_0016x0016_wan.safetensors"]
    report = cache_latents(_config(data, resolution="16", frames="[1, 5]"), vae, skip_existing=True)
    assert report.encoder_calls == 0 and len(report.removed) == 2
    assert "a_00000-005_0016x0016_wan.safetensors" in _names(data / "cache_vid")

    # i2v now asked for: the caches lack the image latents
    report = cache_latents(_config(data, resolution="16", frames="[1, 5]"), vae, i2v=True, skip_existing=True)
    assert len(report.redone) == 6 and all(why == "no latents_image (needed for this training)"
                                           for _, why in report.redone)


def test_a_failed_item_is_reported_and_its_old_caches_stay(data, models):
    vae = models["vae"]
    cache_latents(_config(data), vae)
    (data / "img" / "c.png").write_bytes(b"not an image")
    report = cache_latents(_config(data), vae)
    assert [key for key, _ in report.failed] == [str(data / "img" / "c.png")] and not report.ok
    assert not report.removed and (data / "cache_img" / "c_0040x0024_wan.safetensors").exists()


# ----------------------------------------------------------------------------- text


def test_text_caches_hold_the_trimmed_encoder_output_of_each_caption(data, models):
    te = models["te"]
    config = _config(data)
    report = cache_text_encoder_outputs(config, te, batch_size=1)
    assert report.ok and report.encoder_calls == 4
    assert _names(data / "cache_vid", "_te.safetensors") == TEXT_FILES["vid"]
    assert _names(data / "cache_img", "_te.safetensors") == TEXT_FILES["img"]
    cache = read_text_cache(data / "cache_vid" / "b_wan_te.safetensors")
    expected = te.encode_prompts(["snow falling"])[0]  # the caption file is stripped; the encoder cleans spaces
    assert cache.caption == "snow   falling" and cache.dtype_name == "float32"
    assert cache.t5.shape == expected.shape and cache.t5.shape[0] < 512
    torch.testing.assert_close(cache.t5, expected)

    # reuse, then a changed caption is made again, then a gone item's cache is removed
    again = cache_text_encoder_outputs(config, te, skip_existing=True)
    assert again.encoder_calls == 0 and len(again.reused) == 4
    (data / "img" / "d.txt").write_text("a wolf")
    (data / "vid" / "b.mp4").unlink()
    report = cache_text_encoder_outputs(_config(data), te, skip_existing=True)
    assert [(p.name, why) for p, why in report.redone] == [
        ("d_wan_te.safetensors", "made from caption 'a dog', the caption is now 'a wolf'")]
    assert [p.name for p in report.removed] == ["b_wan_te.safetensors"] and report.encoder_calls == 1
    assert read_text_cache(data / "cache_img" / "d_wan_te.safetensors").caption == "a wolf"


# ----------------------------------------------------------------------------- commands


def _parse(add, argv):
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(argv)


def _check(data, capsys):
    assert run_dataset_check(_parse(add_dataset_check_arguments, [str(data / "d.toml")])) == 0
    return capsys.readouterr().out


def test_commands_cache_a_dataset_end_to_end(data, tiny, capsys, monkeypatch):
    monkeypatch.chdir(data)
    _config(data)
    report = _check(data, capsys)
    assert "items: 2, 4 windows" in report and "items: 2;" in report
    assert "cache: 0 of 4 latent files, 0 of 2 text-encoder files present" in report
    assert "cache: 0 of 2 latent files, 0 of 2 text-encoder files present" in report

    common = ["--dataset_config", "d.toml", "--checkpoint_dir", str(tiny), "--quiet"]
    assert run_cache_latents(_parse(add_cache_latents_arguments, common + ["--model", "test-tiny-t2v"])) == 0
    assert "latent caches: 6 written, 0 reused" in capsys.readouterr().out
    t = tiny / "tiny"
    argv = common + ["--t5", str(t / "umt5.safetensors"), "--tokenizer", str(t / "tokenizer"), "--fp8_t5"]
    assert run_cache_text_encoder_outputs(_parse(add_cache_text_encoder_arguments, argv)) == 0
    assert "text encoder caches: 4 written" in capsys.readouterr().out
    assert read_text_cache(data / "cache_img" / "c_wan_te.safetensors").dtype_name == "bfloat16"
    assert read_latent_cache(data / "cache_img" / "c_0040x0024_wan.safetensors").latents.dtype == torch.bfloat16

    report = _check(data, capsys)
    assert "cache: 4 of 4 latent files, 2 of 2 text-encoder files present" in report
    assert "cache: 2 of 2 latent files, 2 of 2 text-encoder files present" in report

    # explicit files, reused; --model of an i2v model adds its conditioning and CLIP
    argv = common + ["--vae", str(t / "vae_2.1.safetensors"), "--vae_dtype", "float32", "--skip_existing"]
    assert run_cache_latents(_parse(add_cache_latents_arguments, argv)) == 0
    assert "0 written, 6 reused" in capsys.readouterr().out
    argv = common + ["--model", "test-tiny-i2v", "--vae_dtype", "float32", "--skip_existing"]
    assert run_cache_latents(_parse(add_cache_latents_arguments, argv)) == 0
    assert "6 made again" in capsys.readouterr().out
    assert read_latent_cache(data / "cache_vid" / "a_00000-001_0032x0032_wan.safetensors").clip is not None
    assert run_cache_text_encoder_outputs(_parse(add_cache_text_encoder_arguments,
                                                 common + ["--model", "test-tiny-t2v", "--skip_existing"])) == 0
    assert "0 written, 4 reused" in capsys.readouterr().out


def test_commands_name_the_flag_of_bad_input(data, tiny, capsys, monkeypatch):
    monkeypatch.chdir(data)
    _config(data)
    cases = [
        (["--dataset_config", "d.toml"], "--vae: required"),
        (["--dataset_config", "missing.toml", "--vae", "x"], "--dataset_config: 'missing.toml'"),
        (["--dataset_config", "d.toml", "--vae", "nowhere.safetensors"], "--vae: 'nowhere.safetensors'"),
        (["--dataset_config", "d.toml", "--model", "no-such-model"], "--model:"),
        (["--dataset_config", "d.toml", "--vae", "d.toml"], "--vae: 'd.toml' cannot be loaded"),
        (["--dataset_config", "d.toml", "--model", "test-tiny-t2v", "--batch_size", "0"], "--batch_size: 0"),
    ]
    for argv, words in cases:
        assert run_cache_latents(_parse(add_cache_latents_arguments, argv)) == 2, argv
        assert words in capsys.readouterr().err
    (data / "bad.toml").write_text("[[datasets]]\nimage_directory = 'img'\ncaption_extension = '.txt'\nwhat = 1\n")
    assert run_cache_text_encoder_outputs(_parse(add_cache_text_encoder_arguments,
                                                 ["--dataset_config", "bad.toml", "--t5", "x"])) == 2
    assert "bad.toml: datasets[0]" in capsys.readouterr().err
    assert run_cache_text_encoder_outputs(_parse(add_cache_text_encoder_arguments,
                                                 ["--dataset_config", "d.toml"])) == 2
    assert "--t5: required" in capsys.readouterr().err


def test_dataset_check_names_video_caches_after_their_bucket(data):
    config = _config(data, resolution="48")
    text = dataset_check_report(config)
    assert text.splitlines()[0].endswith("d.toml: 2 dataset(s)")
    assert "buckets: 48x48x1: 2, 48x48x9: 2" in text
    (data / "cache_vid").mkdir()
    (data / "cache_vid" / "a_00000-009_0048x0048_wan.safetensors").write_bytes(b"")
    assert "cache: 1 of 4 latent files" in dataset_check_report(config)
    assert os.path.exists(data / "cache_vid" / "a_00000-009_0048x0048_wan.safetensors")
