"""musubi-tuner's Wan cache files: names, keys, dtypes and metadata match a reference writer written here from the
documented layout (independently of wan.train.cache_files), and the reuse check rejects what it must."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wan.train import cache_files as cf

# ---------------------------------------------------------------------------------------------------------------
# Reference writer: musubi's layout, from its save_latent_cache_wan / save_text_encoder_output_cache_wan


def _suffix(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def reference_latent_cache(path, latent, *, size, frame_count=None, image=None, clip=None, control=None, f_idx=None):
    """latent [C, F, H, W]; every suffix is the latent's dtype (clip's too, though clip is fp16)."""
    _, f, h, w = latent.shape
    dt = _suffix(latent.dtype)
    sd = {f"latents_{f}x{h}x{w}_{dt}": latent}
    if clip is not None:
        sd[f"clip_{dt}"] = clip
    if image is not None:
        sd[f"latents_image_{f}x{h}x{w}_{dt}"] = image
    if control is not None:
        sd[f"latents_control_{f}x{h}x{w}_{dt}"] = control
    if f_idx is not None:
        sd["f_indices_int32"] = torch.tensor(f_idx, dtype=torch.int32)
    meta = {"architecture": "wan", "width": str(size[0]), "height": str(size[1]), "format_version": "1.0.1"}
    if frame_count is not None:
        meta["frame_count"] = str(frame_count)
    save_file(sd, str(path), metadata=meta)


def reference_text_cache(path, t5, caption):
    save_file({f"varlen_t5_{_suffix(t5.dtype)}": t5}, str(path),
              metadata={"architecture": "wan", "caption1": caption, "format_version": "1.0.1"})


def layout(path):
    """(metadata, {key: (dtype, shape)}) of a safetensors file."""
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        keys = {k: (fh.get_tensor(k).dtype, tuple(fh.get_tensor(k).shape)) for k in fh.keys()}
    return meta, keys


def i2v_inputs(channels=16, frames=9, lat_h=4, lat_w=6, dtype=torch.bfloat16):
    """Latents, image latents, control latents and CLIP features of a tiny i2v + control item."""
    f = cf.latent_frames(frames)
    latent = torch.randn(channels, f, lat_h, lat_w).to(dtype)
    image = torch.randn(4 + channels, f, lat_h, lat_w).to(dtype)
    control = torch.randn(channels, f, lat_h, lat_w).to(dtype)
    clip = torch.randn(257, 1280).half()
    return latent, image, control, clip


# ---------------------------------------------------------------------------------------------------------------
# Names


def test_names_match_hand_written_strings():
    assert cf.video_latent_cache_name("/data/v/my_clip.mp4", 0, 17, (1280, 720)) == \
        "my_clip_00000-017_1280x0720_wan.safetensors"
    assert cf.video_latent_cache_name("my_clip.mp4", 12345, 81, (640, 360)) == \
        "my_clip_12345-081_0640x0360_wan.safetensors"
    assert cf.video_latent_cache_name("/data/frames/clip01", 4, 5, (96, 64)) == \
        "clip01_00004-005_0096x0064_wan.safetensors"
    assert cf.image_latent_cache_name("/imgs/cat.photo.png", (512, 768)) == "cat.photo_0512x0768_wan.safetensors"
    assert cf.image_latent_cache_name("a.jpg", (10240, 5)) == "a_10240x0005_wan.safetensors"
    assert cf.text_cache_name("/imgs/cat.photo.png") == "cat.photo_wan_te.safetensors"
    assert cf.text_cache_name("/data/v/my_clip.mp4") == "my_clip_wan_te.safetensors"


@pytest.mark.parametrize("media", ["/d/clip.mp4", "/d/my_long_name_v2.webm", "/d/a.b.c.mov", "/d/frames_dir"])
@pytest.mark.parametrize("start,frames,size", [(0, 1, (512, 512)), (16, 81, (1280, 720)), (99999, 129, (33, 4000))])
def test_video_name_round_trip(media, start, frames, size):
    name = cf.video_latent_cache_name(media, start, frames, size)
    parsed = cf.parse_video_cache_name(os.path.join("/cache", name))
    assert (parsed.start, parsed.frames, parsed.original_size, parsed.section) == (start, frames, size, None)
    assert parsed.text_cache_name == cf.text_cache_name(media)  # the pairing the trainer makes


@pytest.mark.parametrize("media", ["/d/cat.png", "/d/my_cat_2.jpg", "/d/x.y.webp"])
@pytest.mark.parametrize("size", [(512, 512), (832, 480), (7, 12000)])
def test_image_name_round_trip(media, size):
    parsed = cf.parse_image_cache_name(cf.image_latent_cache_name(media, size))
    assert parsed.original_size == size and parsed.start is None
    assert parsed.text_cache_name == cf.text_cache_name(media)


def test_parse_tolerates_section_and_rejects_bad_names():
    parsed = cf.parse_video_cache_name("x_y_00008-017-02_0512x0288_wan.safetensors")
    assert (parsed.item_key, parsed.start, parsed.frames, parsed.section) == ("x_y", 8, 17, 2)
    for bad in ["x_0512x0288_wan_te.safetensors", "x_00000-017_512-288_wan.safetensors", "x_0512x0288_hv.safetensors"]:
        with pytest.raises(cf.CacheFileError, match=bad.split("_")[0]):
            cf.parse_video_cache_name(bad)
    with pytest.raises(cf.CacheFileError, match="frame part"):
        cf.parse_video_cache_name("x_0000a-017_0512x0288_wan.safetensors")


def test_find_cache_items_pairs_text_caches_like_the_trainer(tmp_path, caplog):
    latent = torch.zeros(16, 5, 2, 2)
    for media in ("a_b.mp4", "c.mp4"):
        cf.write_latent_cache(tmp_path / cf.video_latent_cache_name(media, 0, 17, (64, 32)), latent,
                              original_size=(64, 32), frame_count=17)
    cf.write_text_cache(tmp_path / cf.text_cache_name("a_b.mp4"), torch.zeros(3, 4096), caption="x")
    with caplog.at_level(logging.WARNING):
        items = cf.find_cache_items(tmp_path, video=True)
    assert [i.name.item_key for i in items] == ["a_b"]
    assert items[0].text_path == tmp_path / "a_b_wan_te.safetensors"
    assert "c_wan_te.safetensors" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Reading what musubi writes, writing what musubi writes


def test_reader_reads_reference_caches(tmp_path):
    latent, image, control, clip = i2v_inputs()
    path = tmp_path / "v_00000-009_0100x0060_wan.safetensors"
    reference_latent_cache(path, latent, size=(100, 60), frame_count=9, image=image, clip=clip, control=control)
    cache = cf.read_latent_cache(path)
    for got, want in ((cache.latents, latent), (cache.image_latents, image), (cache.control_latents, control),
                      (cache.clip, clip)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert cache.f_indices is None and not cache.extra
    assert cache.dtype_names == {"latents": "bfloat16", "latents_image": "bfloat16", "latents_control": "bfloat16",
                                 "clip": "bfloat16"}
    assert cache.key_shapes["latents"] == (3, 4, 6)
    assert (cache.original_size, cache.frame_count, cache.metadata["architecture"]) == ((100, 60), 9, "wan")

    t5 = torch.randn(7, 4096).to(torch.bfloat16)
    reference_text_cache(tmp_path / "v_wan_te.safetensors", t5, "a cat")
    text = cf.read_text_cache(tmp_path / "v_wan_te.safetensors")
    assert torch.equal(text.t5, t5) and text.dtype_name == "bfloat16" and text.caption == "a cat"


def test_reader_tolerates_any_dtype_suffix(tmp_path):
    path = tmp_path / "x_0016x0016_wan.safetensors"
    save_file({"latents_1x2x2_float8_e4m3fn": torch.zeros(16, 1, 2, 2).to(torch.float8_e4m3fn)}, str(path),
              metadata={"architecture": "wan", "width": "16", "height": "16", "format_version": "1.0.1"})
    cache = cf.read_latent_cache(path)
    assert cache.dtype_names == {"latents": "float8_e4m3fn"} and cache.frame_count is None


@pytest.mark.parametrize("kind", ["video_i2v", "image_t2v", "one_frame", "wan22_vae"])
def test_writer_layout_equals_reference(tmp_path, kind):
    latent, image, control, clip = i2v_inputs()
    args = dict(size=(100, 60), frame_count=9, image=image, clip=clip, control=control)
    if kind == "image_t2v":
        latent = torch.randn(16, 1, 4, 6)
        args = dict(size=(100, 60))
    elif kind == "one_frame":
        args = dict(size=(100, 60), image=image, clip=clip.unsqueeze(0), f_idx=[0, 2, 1])
    elif kind == "wan22_vae":
        latent, image, _, _ = i2v_inputs(channels=48)
        args = dict(size=(100, 60), frame_count=9, image=image)
    reference_latent_cache(tmp_path / "ref.safetensors", latent, **args)
    cf.write_latent_cache(tmp_path / "ours.safetensors", latent, original_size=args["size"],
                          frame_count=args.get("frame_count"), image_latents=args.get("image"), clip=args.get("clip"),
                          control_latents=args.get("control"), f_indices=args.get("f_idx"))
    assert layout(tmp_path / "ours.safetensors") == layout(tmp_path / "ref.safetensors")
    ours, ref = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "ref.safetensors")
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_text_writer_layout_equals_reference_and_merges(tmp_path, caplog):
    t5 = torch.randn(11, 4096).to(torch.bfloat16)
    reference_text_cache(tmp_path / "ref_wan_te.safetensors", t5, "a dog")
    cf.write_text_cache(tmp_path / "ours_wan_te.safetensors", t5, caption="a dog")
    assert layout(tmp_path / "ours_wan_te.safetensors") == layout(tmp_path / "ref_wan_te.safetensors")

    # rewriting in another precision replaces the key (no stale bfloat16 copy); a new caption warns
    with caplog.at_level(logging.WARNING):
        cf.write_text_cache(tmp_path / "ours_wan_te.safetensors", t5.float(), caption="a cat")
    meta, keys = layout(tmp_path / "ours_wan_te.safetensors")
    assert keys == {"varlen_t5_float32": (torch.float32, (11, 4096))} and meta["caption1"] == "a cat"
    assert "caption changed" in caplog.text


def test_nan_is_replaced_with_a_warning(tmp_path, caplog):
    latent = torch.randn(16, 1, 2, 2)
    latent[0, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING):
        cf.write_latent_cache(tmp_path / "n_0016x0016_wan.safetensors", latent, original_size=(16, 16))
    assert "latents_1x2x2_float32 tensor has NaN" in caplog.text and "n_0016x0016_wan" in caplog.text
    stored = cf.read_latent_cache(tmp_path / "n_0016x0016_wan.safetensors").latents
    assert stored[0, 0, 0, 0] == 0 and torch.equal(stored.flatten()[1:], latent.flatten()[1:])
    assert torch.isnan(latent[0, 0, 0, 0])  # the caller's tensor is left alone

    fp8 = latent.to(torch.float8_e4m3fn)
    cf.write_latent_cache(tmp_path / "f_0016x0016_wan.safetensors", fp8, original_size=(16, 16))
    stored = cf.read_latent_cache(tmp_path / "f_0016x0016_wan.safetensors")
    assert stored.dtype_names["latents"] == "float8_e4m3fn" and stored.latents.float()[0, 0, 0, 0] == 0


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "a_0016x0016_wan.safetensors"
    cf.write_latent_cache(path, torch.ones(16, 1, 2, 2), original_size=(16, 16))

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(cf.os, "replace", broken_replace)
    with pytest.raises(OSError):
        cf.write_latent_cache(path, torch.zeros(16, 1, 2, 2), original_size=(16, 16))
    assert os.listdir(tmp_path) == [path.name]
    assert torch.equal(cf.read_latent_cache(path).latents, torch.ones(16, 1, 2, 2))


# ---------------------------------------------------------------------------------------------------------------
# I2V conditioning


def test_i2v_mask_and_channel_order():
    frames, h, w = 13, 2, 3
    # musubi's construction: per pixel frame, first frame repeated 4 times, grouped by 4, groups -> channels
    msk = torch.ones(1, frames, h, w)
    msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    expected = msk.view(1, msk.shape[1] // 4, 4, h, w).transpose(1, 2)[0]
    mask = cf.i2v_mask(frames, h, w, torch.float32)
    assert torch.equal(mask, expected) and mask.shape == (4, 4, h, w)

    pixels = cf.i2v_pixel_input(torch.rand(3, 16, 24) * 2 - 1, frames)
    assert pixels.shape == (3, frames, 16, 24) and not pixels[:, 1:].any()
    encoded = torch.randn(16, 4, h, w)
    y = cf.i2v_image_latents(mask, encoded)
    assert y.shape == (20, 4, h, w) and torch.equal(y[:4], mask) and torch.equal(y[4:], encoded)
    with pytest.raises(ValueError, match="4N\\+1"):
        cf.i2v_mask(12, h, w)


# ---------------------------------------------------------------------------------------------------------------
# Reuse or redo


@pytest.fixture
def video_cache(tmp_path):
    """A Wan 2.1 i2v cache for 17 frames of a 96x64 bucket (latents 16 x 5 x 8 x 12), original 1920x1280."""
    latent, image, _, clip = i2v_inputs(frames=17, lat_h=8, lat_w=12)
    path = tmp_path / "v_00000-017_1920x1280_wan.safetensors"
    reference_latent_cache(path, latent, size=(1920, 1280), frame_count=17, image=image, clip=clip)
    return path


def test_valid_cache_is_reused(video_cache):
    check = cf.cache_is_valid(video_cache, 96, 64, 17, original_size=(1920, 1280), need_image_latents=True,
                              need_clip=True)
    assert check and check.reason == ""


@pytest.mark.parametrize("args,kwargs,reason", [
    ((112, 64, 17), {}, "bucket is 112x64"),
    ((96, 64, 21), {}, "21 frames need 6"),
    ((96, 64, 17), {"latent_channels": 48}, "16 latent channels, the VAE makes 48"),
    ((96, 64, 17), {"original_size": (1280, 720)}, "expected 1280x720"),
    ((96, 64, 17), {"need_control": True}, "no latents_control"),
])
def test_mismatch_is_reported(video_cache, args, kwargs, reason):
    check = cf.cache_is_valid(video_cache, *args, **kwargs)
    assert not check and reason in check.reason and str(video_cache) in check.reason


def test_frame_count_metadata_is_checked(tmp_path):
    path = tmp_path / "v_00000-019_0096x0064_wan.safetensors"
    reference_latent_cache(path, torch.zeros(16, 5, 8, 12), size=(96, 64), frame_count=19)
    check = cf.cache_is_valid(path, 96, 64, 17)
    assert not check and "frame_count is 19" in check.reason


def test_wan22_vae_cache(tmp_path):
    path = tmp_path / "i_0096x0064_wan.safetensors"
    reference_latent_cache(path, torch.zeros(48, 1, 4, 6), size=(96, 64))
    assert cf.cache_is_valid(path, 96, 64, 1, latent_channels=48)  # 48 channels, 16 pixels per latent cell
    assert "48 latent channels, the VAE makes 16" in cf.cache_is_valid(path, 96, 64, 1).reason


def test_broken_files_are_invalid_not_crashes(video_cache, tmp_path):
    data = video_cache.read_bytes()
    cases = {
        "truncated": (data[:-100], "truncated?"),
        "header_cut": (data[:40], "does not fit a 40-byte file"),
        "empty": (b"", "too short"),
        "garbage": (b"\xff" * 64, "does not fit a 64-byte file"),
        "bad_json": ((20).to_bytes(8, "little") + b"{" * 20, "not valid JSON"),
        "bad_entry": ((13).to_bytes(8, "little") + b'{"a": [1, 2]}', "malformed tensor entry"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / f"{name}_0096x0064_wan.safetensors"
        path.write_bytes(content)
        check = cf.cache_is_valid(path, 96, 64, 17)
        assert not check and reason in check.reason and str(path) in check.reason, (name, check.reason)
        with pytest.raises(cf.CacheFileError, match=reason.replace("?", "\\?")):
            cf.read_latent_cache(path)
    assert "does not exist" in cf.cache_is_valid(tmp_path / "nope_wan.safetensors", 96, 64).reason


def test_text_cache_validity(tmp_path):
    path = tmp_path / "v_wan_te.safetensors"
    reference_text_cache(path, torch.zeros(5, 4096).to(torch.bfloat16), "a cat")
    assert cf.text_cache_is_valid(path, "a cat")
    assert "caption is now 'a dog'" in cf.text_cache_is_valid(path, "a dog").reason
    path.write_bytes(path.read_bytes()[:-8])
    assert "truncated" in cf.text_cache_is_valid(path).reason
