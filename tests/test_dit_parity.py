"""DiT parity against diffusers on the same random weights, float32 on CPU.

The weights are written once in the official layout, loaded through ``wan.load_transformer``, and
converted with the project's key map for diffusers (strict load), so the key map is tested too.
Tolerance (the issue's): max |ours - ref| / max |ref| <= 1e-4.
"""

import pytest
import torch
from safetensors.torch import save_file

import wan
from helpers import randomize_, rel_err
from wan.loading.keymaps import DIT_DIFFUSERS
from wan.models.dit import DiTConfig, WanDiT

TOL = 1e-4
HEADS, HEAD_DIM = 2, 32


def tiny_cfg(**kw) -> DiTConfig:
    base = dict(dim=HEADS * HEAD_DIM, ffn_dim=96, num_heads=HEADS, num_layers=2, freq_dim=32, text_dim=24)
    base.update(kw)
    return DiTConfig(**base)


def write_official(cfg: DiTConfig, path, seed=0) -> dict:
    """Random weights in the official layout, saved as one safetensors file."""
    model = randomize_(WanDiT(cfg), seed=seed, std=0.15)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def diffusers_model(cfg: DiTConfig, official_state: dict):
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
    kw = dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
              in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
              ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=cfg.eps, rope_max_seq_len=1024)
    if cfg.image_dim:
        kw.update(image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim, pos_embed_seq_len=cfg.image_pos_tokens)
    if cfg.vace_layers:
        ref = WanVACETransformer3DModel(**kw, vace_layers=list(cfg.vace_layers), vace_in_channels=cfg.vace_in_dim)
    else:
        ref = WanTransformer3DModel(**kw)
    converted = {DIT_DIFFUSERS.from_official(k): v for k, v in official_state.items()}
    missing, unexpected = ref.load_state_dict(converted, strict=False)
    # diffusers builds a norm_added_q that the official network does not have (unused in forward)
    missing = [k for k in missing if "norm_added_q" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    return ref.eval()


def inputs(cfg: DiTConfig, frames=3, h=8, w=12, text_tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.out_dim, frames, h, w, generator=g)
    ctx = torch.randn(1, text_tokens, cfg.text_dim, generator=g)
    y = None
    if cfg.in_dim > cfg.out_dim:
        y = torch.randn(1, cfg.in_dim - cfg.out_dim, frames, h, w, generator=g)
    return x, ctx, y, g


def pad512(ctx):
    return torch.nn.functional.pad(ctx, (0, 0, 0, 512 - ctx.shape[1]))


@pytest.mark.parametrize("variant", ["t2v", "i2v", "flf2v"])
def test_dit_matches_diffusers(tmp_path, variant):
    extra = {"t2v": {}, "i2v": dict(in_dim=36, image_dim=40), "flf2v": dict(in_dim=36, image_dim=40, image_pos_tokens=2 * 5)}
    cfg = tiny_cfg(**extra[variant])
    state = write_official(cfg, tmp_path / "dit.safetensors")
    ours = wan.load_transformer(tmp_path / "dit.safetensors", num_heads=HEADS, dtype=torch.float32)
    assert ours.config == cfg and not ours.training
    ref = diffusers_model(cfg, state)

    x, ctx, y, g = inputs(cfg)
    clip = torch.randn(1, cfg.image_pos_tokens or 5, cfg.image_dim, generator=g) if cfg.image_dim else None
    t = torch.tensor([637.0])
    with torch.no_grad():
        out = ours(x, t, ctx, clip_fea=clip, y=y)
        x_ref = x if y is None else torch.cat([x, y], 1)
        # diffusers takes flf2v's two frames as a batch of two and joins them itself
        clip_ref = clip.view(2, -1, clip.shape[-1]) if cfg.image_pos_tokens else clip
        expected = ref(hidden_states=x_ref, timestep=t, encoder_hidden_states=pad512(ctx),
                       encoder_hidden_states_image=clip_ref, return_dict=False)[0]
    assert out.shape == x.shape
    assert rel_err(out, expected) <= TOL


def test_ti2v_per_token_timesteps(tmp_path):
    """Wan 2.2 TI2V: in/out 48 channels, first-frame tokens at t=0, the rest at t."""
    cfg = tiny_cfg(in_dim=48, out_dim=48)
    assert cfg.model_type == "ti2v"
    state = write_official(cfg, tmp_path / "dit.safetensors")
    ours = wan.load_transformer(tmp_path / "dit.safetensors", num_heads=HEADS)
    ref = diffusers_model(cfg, state)
    x, ctx, _, _ = inputs(cfg)
    f, h, w = x.shape[2], x.shape[3] // 2, x.shape[4] // 2
    mask = torch.ones(f, h, w)
    mask[0] = 0
    t = (mask.flatten() * 812.0)[None]
    with torch.no_grad():
        out = ours(x, t, ctx)
        expected = ref(hidden_states=x, timestep=t, encoder_hidden_states=pad512(ctx), return_dict=False)[0]
        uniform = ours(x, torch.tensor([812.0]), ctx)
    assert rel_err(out, expected) <= TOL
    # per-token timesteps must matter: the clean first frame changes the output
    assert rel_err(out, uniform) > 1e-3


def test_vace_matches_diffusers(tmp_path):
    cfg = tiny_cfg(num_layers=4, vace_layers=(0, 2), vace_in_dim=96)
    state = write_official(cfg, tmp_path / "vace.safetensors")
    ours = wan.load_transformer(tmp_path / "vace.safetensors", num_heads=HEADS)
    assert ours.config.vace_layers == (0, 2)
    ref = diffusers_model(cfg, state)
    x, ctx, _, g = inputs(cfg)
    control = torch.randn(1, 96, *x.shape[2:], generator=g)
    t = torch.tensor([411.0])
    with torch.no_grad():
        out = ours(x, t, ctx, vace_context=control, vace_scale=0.7)
        expected = ref(hidden_states=x, timestep=t, encoder_hidden_states=pad512(ctx), control_hidden_states=control,
                       control_hidden_states_scale=torch.full((2,), 0.7), return_dict=False)[0]
        without = ours(x, t, ctx)
    assert rel_err(out, expected) <= TOL
    assert rel_err(out, without) > 1e-3  # the hints do something


def test_text_context_is_zero_padded_to_512():
    """Padding rows are embedded and attended, as in the reference: passing the padded context
    explicitly gives the same result as letting the model pad."""
    cfg = tiny_cfg()
    model = randomize_(WanDiT(cfg), seed=3).eval()
    x, ctx, _, _ = inputs(cfg)
    t = torch.tensor([500.0])
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), model(x, t, pad512(ctx)))
        with pytest.raises(ValueError, match="text_len"):
            model(x, t, torch.randn(1, 513, cfg.text_dim))


def test_fun_ref_conv_tokens_are_prepended_and_removed():
    """Fun V1.1: the reference latent adds one frame of tokens in front, which changes the video
    tokens through attention but is not part of the output."""
    cfg = tiny_cfg(in_dim=48, image_dim=40, ref_conv_in=16)
    model = randomize_(WanDiT(cfg), seed=4).eval()
    x, ctx, y, g = inputs(cfg)
    ref = torch.randn(1, 16, x.shape[3], x.shape[4], generator=g)
    clip = torch.randn(1, 5, 40, generator=g)
    t = torch.tensor([300.0])
    with torch.no_grad():
        out = model(x, t, ctx, clip_fea=clip, y=y, ref_latent=ref)
        plain = model(x, t, ctx, clip_fea=clip, y=y)
    assert out.shape == x.shape
    assert rel_err(out, plain) > 1e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_fused_linear_gelu_equals_plain(dtype, tol):
    """The FFN's fused matmul + GELU(tanh) computes the plain form (up to rounding: bf16 has
    8 bits of mantissa, so 2e-2 relative there)."""
    from wan.models.ops import linear_gelu_tanh
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 96).to(dtype)
    randomize_(lin, seed=1)
    x = torch.randn(33, 64, generator=g).to(dtype)
    with torch.no_grad():  # inference: the fused path
        plain = torch.nn.functional.gelu(lin(x), approximate="tanh")
        assert rel_err(linear_gelu_tanh(lin, x), plain) <= tol


def test_linear_gelu_gives_the_plain_gradients_when_training():
    """The fused op has no backward: with gradients recorded the plain form must run (it once did
    not, and a LoRA's gradients through an unhooked FFN were wrong)."""
    from wan.models.ops import linear_gelu_tanh
    lin = torch.nn.Linear(64, 96)
    randomize_(lin, seed=1)
    x = torch.randn(33, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    linear_gelu_tanh(lin, x).square().sum().backward()
    got = (x.grad.clone(), lin.weight.grad.clone())
    x.grad, lin.weight.grad = None, None
    torch.nn.functional.gelu(lin(x), approximate="tanh").square().sum().backward()
    assert rel_err(got[0], x.grad) <= 1e-6 and rel_err(got[1], lin.weight.grad) <= 1e-6
