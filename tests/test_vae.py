"""Wan 2.1 / 2.2 VAEs: parity with diffusers' AutoencoderKLWan, checkpoint formats, tiling.

Weights are written once in the official layout (``tiny_vae_state_dict``), loaded with
``wan.load_vae``; diffusers gets the same weights through the official -> diffusers key map
(the inverse of the loader's map) with a strict load.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import wan
from tests.helpers import randomize_, rel_err
from wan.loading.files import CheckpointError
from wan.loading.vae import official_to_diffusers
from wan.models.vae21 import LATENTS_MEAN_21, LATENTS_STD_21
from wan.models.vae22 import LATENTS_MEAN_22, LATENTS_STD_22
from wan.models.vae_tiling import TileConfig, run_tiled, tile_spans
from wan.testing.tiny_vae import TINY_VAE_CONFIGS, tiny_vae_state_dict

PARITY_TOL = 1e-4
# A video that spans three chunks (frame 0, then 4 + 4 frames) and 2x2 latents: small because
# at these widths torch runs its slow reference conv3d kernel (the tiny models cost ~1 s a pass).
SIZES = {"2.1": (9, 16), "2.2": (9, 32)}


def _diffusers_vae(version: str, official: dict[str, torch.Tensor]):
    from diffusers import AutoencoderKLWan
    cfg = TINY_VAE_CONFIGS[version]
    common = dict(base_dim=cfg["dim"], z_dim=cfg["z_dim"], dim_mult=cfg["dim_mult"],
                  num_res_blocks=cfg["num_res_blocks"], temperal_downsample=cfg["temporal_downsample"])
    if version == "2.1":
        model = AutoencoderKLWan(**common)
    else:
        model = AutoencoderKLWan(**common, decoder_base_dim=cfg["dec_dim"], is_residual=True,
                                 in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4,
                                 scale_factor_spatial=16, latents_mean=LATENTS_MEAN_22,
                                 latents_std=LATENTS_STD_22)
    names = official_to_diffusers(official)
    assert all(v is not None for v in names.values()), [k for k, v in names.items() if v is None]
    model.load_state_dict({names[k]: v for k, v in official.items()}, strict=True)
    return model.eval()


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def pair(request, tmp_path_factory):
    """(version, our model loaded from an official .pth, diffusers model, official state dict)."""
    version = request.param
    sd = tiny_vae_state_dict(version, seed=1)
    path = tmp_path_factory.mktemp(f"vae{version}") / f"Wan{version}_VAE.pth"
    torch.save(sd, path)
    return version, wan.load_vae(path), _diffusers_vae(version, sd), sd


def _constants(version: str):
    mean, std = (LATENTS_MEAN_21, LATENTS_STD_21) if version == "2.1" else (LATENTS_MEAN_22, LATENTS_STD_22)
    shape = (1, len(mean), 1, 1, 1)
    return torch.tensor(mean).view(shape), torch.tensor(std).view(shape)


def _video(version: str, seed: int = 0) -> torch.Tensor:
    t, s = SIZES[version]
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, 3, t, s, s), generator=g) * 2 - 1


def test_attributes(pair):
    version, ours, _, _ = pair
    assert ours.version == version
    assert ours.z_dim == (16 if version == "2.1" else 48)
    assert ours.stride == ((4, 8, 8) if version == "2.1" else (4, 16, 16))
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    assert len(list(ours.buffers())) == 0  # materialize() needs every buffer in the state dict


def test_encode_parity(pair):
    version, ours, ref, _ = pair
    x = _video(version)
    mean, std = _constants(version)
    with torch.inference_mode():
        z = ours.encode(x)
        mu = ref.encode(x).latent_dist.mean
    expected = (mu - mean) * (1.0 / std)
    t, s = SIZES[version]
    assert z.shape == (1, ours.z_dim, 1 + (t - 1) // 4, s // ours.stride[1], s // ours.stride[2])
    assert z.dtype == torch.float32
    assert rel_err(z, expected) <= PARITY_TOL


def test_decode_parity(pair):
    version, ours, ref, _ = pair
    t, s = SIZES[version]
    g = torch.Generator().manual_seed(3)
    z = torch.randn((1, ours.z_dim, 1 + (t - 1) // 4, s // ours.stride[1], s // ours.stride[2]), generator=g)
    mean, std = _constants(version)
    with torch.inference_mode():
        video = ours.decode(z)
        expected = ref.decode(z / (1.0 / std) + mean).sample  # diffusers takes raw latents
    assert video.shape == (1, 3, t, s, s)
    assert video.abs().max() <= 1.0
    # the random weights must drive the output into the clamp range only partly, or the test
    # would compare mostly constants
    assert (video.abs() < 1.0).float().mean() > 0.5
    assert rel_err(video, expected) <= PARITY_TOL


def test_decode_single_frame_and_batch(pair):
    """Batch of two, one latent frame (the image case), against diffusers."""
    version, ours, ref, _ = pair
    g = torch.Generator().manual_seed(4)
    z = torch.randn((2, ours.z_dim, 1, 2, 3), generator=g)
    mean, std = _constants(version)
    with torch.inference_mode():
        video = ours.decode(z)
        expected = ref.decode(z / (1.0 / std) + mean).sample
    assert video.shape == (2, 3, 1, 2 * ours.stride[1], 3 * ours.stride[2])
    assert rel_err(video, expected) <= PARITY_TOL


# ---------------------------------------------------------------------------------------------
# Formats


def _save_formats(version: str, sd: dict, tmp_path) -> dict[str, object]:
    paths = {}
    paths["pth"] = tmp_path / "vae.pth"
    torch.save(sd, paths["pth"])
    paths["comfy"] = tmp_path / "wan_vae.safetensors"
    save_file(sd, str(paths["comfy"]))
    paths["comfy_prefixed"] = tmp_path / "wan_vae_prefixed.safetensors"
    save_file({"first_stage_model." + k: v for k, v in sd.items()}, str(paths["comfy_prefixed"]))
    pipe = tmp_path / "pipeline"
    _diffusers_vae(version, sd).save_pretrained(pipe / "vae", safe_serialization=True)
    paths["diffusers_pipeline"] = pipe
    paths["diffusers_vae_folder"] = pipe / "vae"
    return paths


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_formats_give_identical_outputs(version, tmp_path):
    sd = tiny_vae_state_dict(version, seed=2)
    paths = _save_formats(version, sd, tmp_path)
    assert (paths["diffusers_vae_folder"] / "config.json").exists()
    assert (paths["diffusers_vae_folder"] / "diffusion_pytorch_model.safetensors").exists()
    t, s = SIZES[version]
    x = _video(version, seed=5)[:, :, :5]
    outs = {}
    with torch.inference_mode():
        for name, path in paths.items():
            vae = wan.load_vae(path)
            assert vae.version == version, name
            z = vae.encode(x)
            outs[name] = (z, vae.decode(z))
    z0, v0 = outs["pth"]
    for name, (z, v) in outs.items():
        assert torch.equal(z, z0), name
        assert torch.equal(v, v0), name


def test_dtype_argument(tmp_path):
    sd = tiny_vae_state_dict("2.1", seed=0)
    save_file(sd, str(tmp_path / "v.safetensors"))
    vae = wan.load_vae(tmp_path / "v.safetensors", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())
    with torch.inference_mode():
        out = vae.decode(torch.zeros(1, 16, 2, 2, 2))
    assert out.dtype == torch.float32 and out.shape == (1, 3, 5, 16, 16)


def test_hyperparameters_inferred(tmp_path):
    """Full-size hyperparameters are read from shapes (a meta-device state dict is enough)."""
    from wan.loading.vae import infer_vae_config
    from wan.models.vae21 import WanVAE21
    from wan.models.vae22 import WanVAE22
    with torch.device("meta"):
        full21, full22 = WanVAE21(), WanVAE22()
    v, cfg = infer_vae_config({k: tuple(t.shape) for k, t in full21.state_dict().items()})
    assert v == "2.1" and cfg == full21.config
    v, cfg = infer_vae_config({k: tuple(t.shape) for k, t in full22.state_dict().items()})
    assert v == "2.2" and cfg == full22.config and cfg["dim"] == 160 and cfg["dec_dim"] == 256


def test_wrong_family_is_a_clear_error(tmp_path):
    dit = {"patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": torch.zeros(4, 4)}
    path = tmp_path / "wan2.1_t2v_1.3B.safetensors"
    save_file(dit, str(path))
    with pytest.raises(CheckpointError, match=r"wan2\.1_t2v_1\.3B\.safetensors.*does not look like a Wan VAE"):
        wan.load_vae(path)


def test_missing_tensor_is_a_clear_error(tmp_path):
    sd = tiny_vae_state_dict("2.1", seed=0)
    del sd["decoder.upsamples.12.residual.6.weight"]
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*decoder\.upsamples\.12\.residual\.6\.weight"):
        wan.load_vae(path)


def test_bad_input_shape_is_a_clear_error(pair):
    version, ours, _, _ = pair
    with pytest.raises(ValueError, match=r"shape \(1, 3, 6, 32, 32\).*T = 1 \+ 4k"):
        ours.encode(torch.zeros(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match=r"H, W multiples of %d" % ours.stride[1]):
        ours.encode(torch.zeros(1, 3, 5, 36, 32))
    with pytest.raises(ValueError, match=r"expected \[B, %d, F, h, w\]" % ours.z_dim):
        ours.decode(torch.zeros(1, 4, 2, 4, 4))


# ---------------------------------------------------------------------------------------------
# Tiling


def test_tiling_blend_is_exact_for_a_local_function():
    """The tile layout and the linear blend: for a function without spatial context (nearest
    upsampling) tiles agree in their overlaps, so the blend must reproduce the untiled result."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn((1, 2, 3, 40, 56), generator=g)
    fn = lambda t: t.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4) * 2.0  # noqa: E731
    tiled = run_tiled(fn, x, tile=16, overlap=5, in_scale=1, out_scale=8)
    assert tiled.shape == (1, 2, 3, 320, 448)
    assert rel_err(tiled, fn(x)) <= 1e-6
    assert tile_spans(40, 16, 5) == [(0, 16), (11, 27), (22, 38), (24, 40)]


def test_tiled_close_to_untiled(tmp_path):
    """Tiled decode/encode of a tiny Wan 2.1 VAE against the untiled pass.

    Tiling is not exact: each conv sees zero padding at a tile border where the untiled pass sees
    the neighbouring pixels, and this reaches across the whole receptive field (11 latent pixels
    before the first upsampler); the linear blend over the overlap only softens the seams. The
    per-frame attention of the middle blocks is global over the frame, so with random weights it
    would make every pixel depend on the whole frame; its output projection is zeroed here, as
    the reference initialises it, and a trained VAE uses it mostly locally. The test bounds the
    mean error (relative to the mean magnitude of the output) and the worst pixel.
    """
    sd = tiny_vae_state_dict("2.1", seed=6)
    for k in sd:
        if k.endswith("middle.1.proj.weight"):
            sd[k].zero_()
    save_file(sd, str(tmp_path / "v.safetensors"))
    vae = wan.load_vae(tmp_path / "v.safetensors")
    s = vae.stride[1]
    g = torch.Generator().manual_seed(7)
    z = torch.randn((1, vae.z_dim, 2, 16, 16), generator=g)
    tile = TileConfig(tile=12 * s, overlap=8 * s)
    with torch.inference_mode():
        full = vae.decode(z)
        tiled = vae.decode(z, tile=tile)
        enc_full = vae.encode(full[:, :, :1])
        enc_tiled = vae.encode(full[:, :, :1], tile=tile)

    def mean_rel(a, b):
        return ((a - b).abs().mean() / b.abs().mean()).item()

    assert tiled.shape == full.shape and enc_tiled.shape == enc_full.shape
    assert 0 < mean_rel(tiled, full) <= 0.15, mean_rel(tiled, full)
    assert 0 < mean_rel(enc_tiled, enc_full) <= 0.15, mean_rel(enc_tiled, enc_full)
    assert rel_err(tiled, full) <= 0.6
    # a tile as large as the frame is the untiled pass itself
    with torch.inference_mode():
        assert torch.equal(vae.decode(z, tile=TileConfig(tile=16 * s, overlap=2 * s)), full)


# ---------------------------------------------------------------------------------------------
# Exact reformulations used for speed (each against the plain form it replaces)

EXACT_TOL = 1e-6  # float32 summation order only


def _random_causal_conv(cin: int, cout: int, seed: int):
    from wan.models.vae_blocks import CausalConv3d
    conv = CausalConv3d(cin, cout, 3, padding=1)
    randomize_(conv, seed)
    return conv.eval().requires_grad_(False)


def _frames(x: torch.Tensor) -> list[torch.Tensor]:
    """[B, C, T, H, W] -> T channels-last frames [B, C, H, W]."""
    return [f.contiguous(memory_format=torch.channels_last) for f in x.unbind(2)]


def test_upsample2x_conv_equals_upsample_then_conv():
    """Sub-pixel form: 4 phase 2x2 convs on the low-resolution input == nearest-exact 2x
    upsampling followed by the 3x3 conv (borders included)."""
    import torch.nn.functional as F

    from wan.models.vae_blocks import upsample2x_conv
    g = torch.Generator().manual_seed(11)
    x = torch.randn((2, 5, 6, 7), generator=g)
    conv = torch.nn.Conv2d(5, 4, 3, padding=1)
    randomize_(conv, 12)
    up = F.interpolate(x, scale_factor=2.0, mode="nearest-exact")
    # at an exact factor 2, nearest-exact is index doubling (what the decomposition relies on)
    assert torch.equal(up, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    with torch.inference_mode():
        ours = upsample2x_conv(conv, x)
        ref = conv(up)
    assert ours.shape == (2, 4, 12, 14)
    assert rel_err(ours, ref) <= EXACT_TOL


def test_causal_conv_frame_equals_chunked_conv3d():
    """One frame at a time as per-time-slice 2D convs (history by reference, zero frames skipped,
    oldest history storage recycled for the new activation) == the 3D conv over chunks with
    cached history, with and without the fused norm + SiLU and the residual accumulation."""
    from wan.models.vae_blocks import (
        CausalCache,
        RMS_norm,
        causal_conv_frame,
        norm_silu_causal_conv,
        time_slice_major_,
    )
    conv = _random_causal_conv(6, 5, seed=13)
    norm = RMS_norm(6, images=False)
    randomize_(norm, 14)
    g = torch.Generator().manual_seed(15)
    x = torch.randn((2, 6, 5, 4, 3), generator=g).contiguous(memory_format=torch.channels_last_3d)
    residual = torch.randn((2, 5, 5, 4, 3), generator=g)
    with torch.inference_mode():
        chunk_cache = CausalCache()
        chunks = [x[:, :, :1], x[:, :, 1:]]  # frame 0 alone, then 4 frames (the driver's split)
        plain = torch.cat([conv(c, chunk_cache) for c in chunks], dim=2)
        chunk_cache = CausalCache()
        normed = torch.cat([norm_silu_causal_conv(norm, conv, c, chunk_cache) for c in chunks], dim=2)
        for relayout in (False, True):
            if relayout:
                time_slice_major_(conv)
            cache = CausalCache()
            frames = torch.stack([causal_conv_frame(conv, f, cache) for f in _frames(x)], dim=2)
            assert rel_err(frames, plain) <= EXACT_TOL
            cache = CausalCache()
            outs = []
            for f, r in zip(_frames(x), _frames(residual)):
                outs.append(causal_conv_frame(conv, f, cache, acc=r.clone(), norm=norm))
            assert rel_err(torch.stack(outs, dim=2), normed + residual) <= EXACT_TOL


def test_causal_conv_frame_push_equals_chunked_conv3d():
    """The head's form, which caches partial sums of the next outputs instead of input frames."""
    from wan.models.vae_blocks import CausalCache, causal_conv_frame_push
    conv = _random_causal_conv(8, 3, seed=16)
    g = torch.Generator().manual_seed(17)
    x = torch.randn((1, 8, 6, 5, 4), generator=g).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        chunk_cache = CausalCache()
        ref = torch.cat([conv(x[:, :, :1], chunk_cache), conv(x[:, :, 1:], chunk_cache)], dim=2)
        cache = CausalCache()
        ours = torch.stack([causal_conv_frame_push(conv, f, cache) for f in _frames(x)], dim=2)
    assert cache.get(conv)[0].shape[1] == 3  # history of output channels, not input channels
    assert rel_err(ours, ref) <= EXACT_TOL


def test_fused_conv_accumulate_equals_conv_then_add():
    import torch.nn.functional as F

    from wan.models.vae_blocks import _fused_accumulate_ok, conv2d_accumulate_
    g = torch.Generator().manual_seed(18)
    x = torch.randn((2, 16, 9, 7), generator=g).contiguous(memory_format=torch.channels_last)
    acc = torch.randn((2, 8, 9, 7), generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn((8, 16, 3, 3), generator=g), torch.randn(8, generator=g)
    expected = acc + F.conv2d(x, w, b, padding=1)
    with torch.inference_mode():
        for fused in (True, False):
            out = conv2d_accumulate_(acc.clone(), x, w, b, (1, 1), fused=fused)
            assert rel_err(out, expected) <= EXACT_TOL, fused
    if not _fused_accumulate_ok(acc, x):
        pytest.skip("oneDNN fused accumulation not available here: only the fallback was checked")


def test_rms_norm_frame_equals_rms_norm():
    """Per-pixel L2 norm on the channels-last [pixels, C] view == RMS_norm (F.normalize
    semantics: a pixel of zeros stays zero), out of place and in place."""
    import torch.nn.functional as F

    from wan.models.vae_blocks import RMS_norm, rms_norm_frame
    norm = RMS_norm(7)
    randomize_(norm, 19)
    g = torch.Generator().manual_seed(20)
    x = torch.randn((2, 7, 5, 6), generator=g).contiguous(memory_format=torch.channels_last)
    x[:, :, 1, 2] = 0.0
    with torch.inference_mode():
        ref = F.silu(norm(x))
        ours = rms_norm_frame(norm, x, silu=True)
        assert rel_err(ours, ref) <= EXACT_TOL
        assert torch.equal(ours[:, :, 1, 2], torch.zeros(2, 7))
        assert torch.equal(rms_norm_frame(norm, x.clone(), out=None), rms_norm_frame(norm, x.clone(), out=x))


def test_prepared_weight_layout_changes_nothing_but_speed(tmp_path):
    """load_vae stores the frame-path conv weights time-slice-major; values, shapes, the state
    dict and the decoded video are those of a plainly loaded model."""
    from wan.models.vae21 import WanVAE21
    from wan.testing.tiny_vae import TINY_VAE_CONFIGS
    sd = tiny_vae_state_dict("2.1", seed=21)
    save_file(sd, str(tmp_path / "v.safetensors"))
    prepared = wan.load_vae(tmp_path / "v.safetensors")
    plain = WanVAE21(**TINY_VAE_CONFIGS["2.1"])
    plain.load_state_dict(sd)
    plain.eval().requires_grad_(False)
    w = prepared.decoder.upsamples[0].residual[2].weight
    assert w[:, :, 1].is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(prepared.state_dict()[k], v) for k, v in sd.items())
    z = torch.randn((1, 16, 3, 2, 3), generator=torch.Generator().manual_seed(22))
    with torch.inference_mode():
        # not bit-equal: with another weight layout the conv kernels may sum in another order,
        # and the differences add up over the ~30 layers of the decoder
        assert rel_err(prepared.decode(z), plain.decode(z)) <= 10 * EXACT_TOL
