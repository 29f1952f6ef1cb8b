"""The Wan diffusion transformer (DiT), Wan 2.1 and 2.2, every public variant.

One implementation; variants differ only by configuration (:class:`DiTConfig`):

=================  ==============================================================================
t2v / t2i          the plain network (1.3B: dim 1536, 30 layers; 14B: dim 5120, 40 layers)
i2v, Fun InP/Ctrl  ``in_dim`` 36 or 48 (noise + conditioning channels ``y``), ``image_dim`` set:
                   CLIP features projected by ``img_emb`` and attended through ``k_img``/``v_img``
flf2v              as i2v, plus ``img_emb.emb_pos`` for the 2x257 image tokens
Fun V1.1           ``ref_conv``: a reference-image latent, prepended as one extra frame of tokens
VACE               ``vace_blocks`` produce hints added after the main blocks listed in ``vace_layers``
Wan 2.2 A14B       as t2v/i2v without CLIP (two experts are two instances)
Wan 2.2 TI2V-5B    ``in_dim`` = ``out_dim`` = 48, per-token timesteps
=================  ==============================================================================

Module and parameter names equal the official checkpoint keys, so official and ComfyUI files load
without renaming. Precision follows the official code: the residual stream, norms, modulation,
time embedding and head run in float32; the linear layers of attention and FFN run in the dtype
of their weights (``compute dtype``), which is what the reference's bf16 autocast does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan.models.attention import AttentionFn, attention_with_key_counts, sdpa_attention
from wan.models.ops import linear_gelu_tanh


@dataclass(frozen=True)
class DiTConfig:
    """Hyperparameters of one DiT. Every field can be read off checkpoint tensor shapes, except
    ``num_heads`` (head_dim is 128 in every public Wan DiT)."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    eps: float = 1e-6
    image_dim: int | None = None       # CLIP feature width (1280) when the model has img_emb
    image_pos_tokens: int | None = None  # flf2v: length of img_emb.emb_pos (514)
    vace_layers: tuple[int, ...] = ()  # main blocks that receive a VACE hint, in hint order
    vace_in_dim: int = 96
    ref_conv_in: int | None = None     # Fun V1.1 reference-image conv input channels (16)

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"DiTConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def model_type(self) -> str:
        """The reference's name for the variant: t2v, i2v, flf2v, vace or ti2v."""
        if self.vace_layers:
            return "vace"
        if self.image_pos_tokens:
            return "flf2v"
        if self.image_dim:
            return "i2v"
        if self.out_dim == 48:
            return "ti2v"
        return "t2v" if self.in_dim == self.out_dim else "i2v"


# ---------------------------------------------------------------------------------------------
# Position and time encodings


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep sinusoid of the reference: float64, cos before sin.

    Args:
        t: timesteps of any shape, on the 0..1000 scale.
    Returns:
        ``t.shape + (dim,)`` in float32.
    """
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.double().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def rope_angles(grid: tuple[int, int, int], head_dim: int, device=None,
                riflex: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D RoPE tables for a (frames, height, width) token grid.

    The head dimension is split into frame/height/width parts of ``d - 4*(d//6)``, ``2*(d//6)``,
    ``2*(d//6)`` channels (44/42/42 for d=128), each with its own frequency ladder, positions being
    integer grid indices from 0. Angles are computed in float64 as the reference does.

    ``riflex`` = (k, latent_frames) applies RIFLEx for long clips: the k-th (1-based) frame
    frequency becomes 0.9 * 2pi / latent_frames, so it does not complete a period within the clip.

    Returns:
        cos, sin: ``[f*h*w, head_dim // 2]`` float32, tokens in (f, h, w) order.
    """
    f, h, w = grid
    d_hw = 2 * (head_dim // 6)
    d_t = head_dim - 2 * d_hw

    def axis(n: int, dim_axis: int, riflex=None) -> torch.Tensor:
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, dim_axis, 2, dtype=torch.float64, device=device) / dim_axis)
        if riflex is not None:
            k, frames = riflex
            inv[k - 1] = 0.9 * 2 * math.pi / frames
        return torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv)

    at, ah, aw = axis(f, d_t, riflex), axis(h, d_hw), axis(w, d_hw)
    angles = torch.cat([
        at[:, None, None, :].expand(f, h, w, -1),
        ah[None, :, None, :].expand(f, h, w, -1),
        aw[None, None, :, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, head_dim // 2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotates adjacent channel pairs (2i, 2i+1) of ``x [B, L, heads, head_dim]``; float32 out."""
    cos, sin = rope[0][None, :, None, :], rope[1][None, :, None, :]
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------
# Text context


class TextGuide(Protocol):
    """Guidance in the text cross-attention's output space, set from outside for one pass (NAG,
    :mod:`wan.optim.nag`): every cross-attention also attends to ``negative`` with the same
    queries and hands both outputs to the guide, which returns the one the block uses."""

    negative: "TextContext"

    def __call__(self, z_pos: torch.Tensor, z_neg: torch.Tensor) -> torch.Tensor:
        """z_pos, z_neg: text attention outputs [B, L, dim] (heads flattened, before the output
        projection; image attention not included) -> [B, L, dim], same dtype."""


@dataclass
class TextContext:
    """Embedded text tokens, with the zero padding to ``text_len`` folded into one row.

    The reference pads the text states with zeros to 512 rows and attends to all of them. Every
    padding row embeds to the same vector, so ``rows`` holds the real rows plus one padding row and
    ``log_counts`` gives that row the weight of all the padding rows it stands for (exact; see
    :func:`attention_with_key_counts`). ``log_counts`` is None when nothing was folded.

    ``guide`` is None (plain attention) unless a block runner set one for the pass (see
    :class:`TextGuide`); the network only calls it.
    """

    rows: torch.Tensor                 # [B, L_rows, dim]
    log_counts: torch.Tensor | None    # [L_rows] float32
    guide: TextGuide | None = None


def fold_padding(context: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text states [B, L <= text_len, C] -> (rows, log_counts): the rows up to the last non-zero
    one (over the batch), plus one zero row standing for the remaining padding rows."""
    if context.shape[1] > text_len:
        raise ValueError(f"context has {context.shape[1]} tokens, at most text_len={text_len} are allowed")
    nonzero = (context != 0).any(dim=2).any(dim=0).nonzero()
    real = int(nonzero[-1]) + 1 if len(nonzero) else 0
    n_pad = text_len - real
    if n_pad < 2:
        return F.pad(context, (0, 0, 0, text_len - context.shape[1])), None
    rows = F.pad(context[:, :real], (0, 0, 0, 1))
    log_counts = torch.zeros(real + 1, dtype=torch.float32, device=context.device)
    log_counts[-1] = math.log(n_pad)
    return rows, log_counts


# ---------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32, cast back, then scaled by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype; returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a layer computes in: a quantised layer says so (``compute_dtype``), a plain one
    computes in its weight's dtype."""
    cdt = getattr(layer, "compute_dtype", None)
    return cdt if cdt is not None else layer.weight.dtype


def _linear_in(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Feeds ``x`` to a layer in the layer's compute dtype (autocast without autocast)."""
    return layer(x.to(compute_dtype(layer)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, rope, attention: AttentionFn) -> torch.Tensor:
        """x [B, L, dim] in compute dtype -> [B, L, dim]."""
        shape = (*x.shape[:2], self.num_heads, -1)
        q = apply_rope(self.norm_q(self.q(x)).view(shape), rope)
        k = apply_rope(self.norm_k(self.k(x)).view(shape), rope)
        v = self.v(x).view(shape)
        return self.o(attention(q, k, v).flatten(2))


class CrossAttention(nn.Module):
    """Attention from video tokens to text tokens; with ``image_input`` also to image tokens,
    through separate keys/values whose result is added before the output projection."""

    def __init__(self, dim: int, num_heads: int, eps: float, image_input: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        if image_input:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x, context: "TextContext", context_img, attention: AttentionFn) -> torch.Tensor:
        """x [B, L, dim]; context: embedded text rows; context_img [B, 257|514, dim] or None."""
        b = x.shape[0]
        q = self.norm_q(self.q(x)).view(b, -1, self.num_heads, x.shape[-1] // self.num_heads)
        out = self._attend_text(q, context, attention)
        if context.guide is not None:  # guidance on the text attention alone, before the image's is added
            z_neg = self._attend_text(q, context.guide.negative, attention)
            out = context.guide(out.flatten(2), z_neg.flatten(2)).view_as(out)
        if context_img is not None:
            k_img = self.norm_k_img(self.k_img(context_img)).view(b, -1, *q.shape[2:])
            out = out + attention(q, k_img, self.v_img(context_img).view(b, -1, *q.shape[2:]))
        return self.o(out.flatten(2))

    def _attend_text(self, q: torch.Tensor, context: "TextContext", attention: AttentionFn) -> torch.Tensor:
        """q [B, L, heads, head_dim] attending to the text rows -> [B, L, heads, head_dim]."""
        k = self.norm_k(self.k(context.rows)).view(q.shape[0], -1, *q.shape[2:])
        v = self.v(context.rows).view(q.shape[0], -1, *q.shape[2:])
        if context.log_counts is None:
            return attention(q, k, v)
        return attention_with_key_counts(q, k, v, context.log_counts)


class Block(nn.Module):
    """One transformer block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm32(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm32(dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, image_input=cfg.image_dim is not None)
        self.norm2 = LayerNorm32(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x, e0, context, context_img, rope, attention: AttentionFn):
        """x [B, L, dim] float32 residual stream; e0 [B, 1|L, 6, dim] float32."""
        cdt = compute_dtype(self.ffn[0])
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float().unsqueeze(0) + e0).unbind(2)
        h = torch.addcmul(shift_sa, self.norm1(x), 1 + scale_sa)
        x = torch.addcmul(x, self.self_attn(h.to(cdt), rope, attention).float(), gate_sa)
        x = x + self.cross_attn(self.norm3(x).to(cdt), context, context_img, attention).float()
        h = torch.addcmul(shift_ff, self.norm2(x), 1 + scale_ff)
        ffn = self.ffn[2](linear_gelu_tanh(self.ffn[0], h.to(cdt)))  # = self.ffn(h), GELU fused
        return torch.addcmul(x, ffn.float(), gate_ff)


class VaceBlock(Block):
    """A block of the VACE branch: the first one also projects the control tokens in
    (``before_proj``); each emits a hint through ``after_proj``."""

    def __init__(self, cfg: DiTConfig, first: bool):
        super().__init__(cfg)
        if first:
            self.before_proj = nn.Linear(cfg.dim, cfg.dim)
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim] float32; e [B, 1|L, dim] (time embedding before projection)."""
        shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return _linear_in(self.head, torch.addcmul(shift, self.norm(x), 1 + scale))


class ImageEmbedding(nn.Module):
    """CLIP features -> DiT width: LayerNorm, Linear, GELU, Linear, LayerNorm (keys proj.0/1/3/4)."""

    def __init__(self, in_dim: int, dim: int, pos_tokens: int | None):
        super().__init__()
        self.proj = nn.Sequential(LayerNorm32(in_dim, eps=1e-5), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, dim), LayerNorm32(dim, eps=1e-5))
        if pos_tokens:
            self.emb_pos = nn.Parameter(torch.zeros(1, pos_tokens, in_dim))

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "emb_pos"):
            clip_fea = clip_fea.float() + self.emb_pos.float()
        h = self.proj[0](clip_fea)
        h = _linear_in(self.proj[3], self.proj[2](_linear_in(self.proj[1], h)))
        return self.proj[4](h)


@dataclass
class BlockInputs:
    """What every main block receives besides the tokens, for a block runner.

    ``e`` [B, 1|L, dim] is the time embedding (TeaCache measures its change between steps).
    ``vace_tokens`` [B, L, dim] are the patchified VACE control tokens: :meth:`WanDiT.run_blocks`
    turns them into ``hints`` before the first block (so a runner that shards the sequence, as
    ``wan.parallel.ulysses`` does, shards them with the tokens; a step the cache skips never runs
    the VACE branch). ``hints`` given already are used as they are.
    """

    e: torch.Tensor
    e0: torch.Tensor
    context: TextContext
    context_img: torch.Tensor | None
    rope: tuple[torch.Tensor, torch.Tensor]
    hints: list[torch.Tensor] | None
    vace_scale: float
    vace_tokens: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# The network


class WanDiT(nn.Module):
    """Wan diffusion transformer. See the module docstring for the variants."""

    # Traits read by the tools in wan.optim (offload, compile, quantisation): the repeated block
    # type, and parameter name fragments that stay float32 whatever the load dtype is.
    _repeated_blocks = ("Block", "VaceBlock")
    _keep_in_fp32 = ("modulation", "norm", "head.head", "time_embedding", "time_projection",
                     "img_emb.proj.0", "img_emb.proj.4", "emb_pos")

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.image_dim:
            self.img_emb = ImageEmbedding(cfg.image_dim, dim, cfg.image_pos_tokens)
        if cfg.ref_conv_in:
            self.ref_conv = nn.Conv2d(cfg.ref_conv_in, dim, kernel_size=cfg.patch_size[1:], stride=cfg.patch_size[1:])
        if cfg.vace_layers:
            self.vace_patch_embedding = nn.Conv3d(cfg.vace_in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
            self.vace_blocks = nn.ModuleList(VaceBlock(cfg, first=(i == 0)) for i in range(len(cfg.vace_layers)))
        # The attention kernel; wan.optim swaps it for a faster backend.
        self.attention: AttentionFn = sdpa_attention
        # Runs the main blocks: None runs them all (run_blocks). Step caches and skip-layer
        # guidance install a callable (dit, tokens, BlockInputs) -> tokens here, from outside.
        self.block_runner = None
        # RIFLEx (k, latent frames) for long clips, set per generation from outside; None: off.
        self.riflex: tuple[int, int] | None = None

    @classmethod
    def keep_in_fp32(cls, name: str) -> bool:
        return any(frag in name for frag in cls._keep_in_fp32)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                clip_fea: torch.Tensor | None = None, y: torch.Tensor | None = None,
                vace_context: torch.Tensor | None = None, vace_scale: float = 1.0,
                *, ref_latent: torch.Tensor | None = None) -> torch.Tensor:
        """Predicts the flow (noise minus clean latent) for a batch of latent videos.

        Args:
            x: noisy latents [B, C, F, H, W].
            timestep: [B], or [B, tokens] per-token (Wan 2.2 TI2V), on the 0..1000 scale.
            context: text encoder states [B, L <= text_len, text_dim]; zero-padded to text_len here.
            clip_fea: CLIP features [B, 257 | 514, image_dim] for i2v (514: flf2v's two frames).
            y: conditioning latents [B, C_y, F, H, W], concatenated after x on channels.
            vace_context: VACE control latents [B, vace_in_dim, F, H, W].
            vace_scale: strength of the VACE hints.
            ref_latent: Fun V1.1 reference image latent [B, 16, H, W].
        Returns:
            [B, out_dim, F, H, W] float32.
        """
        cfg = self.config
        cdt = compute_dtype(self.blocks[0].ffn[0])
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        tokens = self._patchify(self.patch_embedding, x)
        f, h, w = (n // p for n, p in zip(x.shape[2:], cfg.patch_size))
        n_ref = 0
        if ref_latent is not None:
            ref = _linear_in(self.ref_conv, ref_latent).flatten(2).transpose(1, 2).float()
            n_ref = ref.shape[1]
            tokens = torch.cat([ref, tokens], dim=1)
            f += 1
        rope = rope_angles((f, h, w), cfg.head_dim, device=x.device, riflex=self.riflex)

        e, e0 = self._time_embedding(timestep, n_ref)
        context, context_img = self._context(context, clip_fea, cdt)

        vace_tokens = None
        if vace_context is not None:  # the hints are made by run_blocks, on the tokens it is given
            vace_tokens = self._patchify(self.vace_patch_embedding, vace_context)
        inputs = BlockInputs(e, e0, context, context_img, rope, None, vace_scale, vace_tokens)
        if self.block_runner is not None:
            tokens = self.block_runner(self, tokens, inputs)
        else:
            tokens = self.run_blocks(tokens, inputs)

        out = self.head(tokens, e)[:, n_ref:]
        return self._unpatchify(out, (f - (1 if n_ref else 0), h, w))

    def run_blocks(self, tokens: torch.Tensor, inputs: "BlockInputs", skip: frozenset[int] = frozenset()) -> torch.Tensor:
        """The main blocks in order, with VACE hints added after their layers; blocks whose index
        is in ``skip`` are left out (skip-layer guidance). VACE control tokens (``inputs.vace_tokens``)
        become hints here first, unless ``inputs.hints`` are given."""
        hints = inputs.hints
        if hints is None and inputs.vace_tokens is not None:
            hints = self._vace_hints(tokens, inputs)
        hint_at = {layer: i for i, layer in enumerate(self.config.vace_layers)}
        for i, block in enumerate(self.blocks):
            if i in skip:
                continue
            tokens = block(tokens, inputs.e0, inputs.context, inputs.context_img, inputs.rope, self.attention)
            if hints is not None and i in hint_at:
                tokens = tokens + hints[hint_at[i]] * inputs.vace_scale
        return tokens

    # -- pieces of forward ----------------------------------------------------------------------

    @staticmethod
    def _patchify(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> float32 tokens [B, f*h*w, dim] in (f, h, w) order."""
        return _linear_in(conv, x).flatten(2).transpose(1, 2).float()

    def _time_embedding(self, timestep: torch.Tensor, n_ref: int):
        """Returns e [B, 1|L, dim] and e0 [B, 1|L, 6, dim], float32."""
        t = timestep.reshape(timestep.shape[0], -1)  # [B, 1] or [B, L]
        if n_ref and t.shape[1] > 1:  # reference tokens are clean: t = 0
            t = torch.cat([t.new_zeros(t.shape[0], n_ref), t], dim=1)
        e = _linear_in(self.time_embedding[2], self.time_embedding[1](
            _linear_in(self.time_embedding[0], sinusoidal_embedding(t, self.config.freq_dim)))).float()
        e0 = _linear_in(self.time_projection[1], F.silu(e)).float().unflatten(-1, (6, self.config.dim))
        return e, e0

    def embed_text(self, context: torch.Tensor) -> TextContext:
        """Text encoder states [B, L <= text_len, text_dim] -> the embedded rows every block attends
        to (zero padding to text_len folded), in the blocks' compute dtype."""
        rows, log_counts = fold_padding(context, self.config.text_len)
        rows = self.text_embedding(rows.to(compute_dtype(self.text_embedding[0])))
        return TextContext(rows.to(compute_dtype(self.blocks[0].ffn[0])), log_counts)

    def _context(self, context: torch.Tensor, clip_fea, cdt):
        """Text states padded with zeros to text_len and embedded; CLIP features embedded."""
        cfg = self.config
        context = self.embed_text(context)
        context_img = None
        if clip_fea is not None:
            if not cfg.image_dim:
                raise ValueError("clip_fea was given, but this model has no image input (img_emb)")
            context_img = self.img_emb(clip_fea).to(cdt)
        return context, context_img

    def _vace_hints(self, tokens: torch.Tensor, inputs: "BlockInputs") -> list[torch.Tensor]:
        """Runs the VACE branch once on ``inputs.vace_tokens`` [B, L, dim] beside ``tokens``;
        returns one hint [B, L, dim] per entry of vace_layers."""
        c = _linear_in(self.vace_blocks[0].before_proj, inputs.vace_tokens).float() + tokens
        hints = []
        for block in self.vace_blocks:
            c = block(c, inputs.e0, inputs.context, inputs.context_img, inputs.rope, self.attention)
            hints.append(_linear_in(block.after_proj, c).float())
        return hints

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, f*h*w, out_dim*pt*ph*pw] -> [B, out_dim, f*pt, h*ph, w*pw]."""
        (f, h, w), (pt, ph, pw) = grid, self.config.patch_size
        b, c = x.shape[0], self.config.out_dim
        x = x.view(b, f, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, f * pt, h * ph, w * pw).float()
