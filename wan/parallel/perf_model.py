"""What parallel generation should cost and gain: FLOPs of the DiT, bytes sent, predicted speed-up.

Pure arithmetic on the model's dimensions (any object with the fields of ``DiTConfig``: ``dim``,
``ffn_dim``, ``num_heads``, ``num_layers``, ``out_dim``, ``patch_size``, ``text_len``, optionally
``vace_layers``), no torch.

FLOPs (one multiply-add = 2 FLOPs), per forward of batch 1 over ``L`` video tokens, per block:

- self-attention: q, k, v, o projections ``8 L d^2``; scores and weighted sum ``4 L^2 d``;
- cross-attention: q, o projections ``4 L d^2``; k, v of the ``T`` text rows (512: the padded
  context is attended whole) ``4 T d^2``; attention ``4 L T d``; with image tokens ``I`` (i2v,
  257 or 514), ``4 I d^2 + 4 L I d`` more;
- FFN: ``4 L d f``.

A VACE model runs its ``len(vace_layers)`` VACE blocks once per forward as well. Embeddings, head
and modulation are left out (well under 1%).

Bytes each rank sends (what :mod:`wan.parallel.ulysses` and :mod:`wan.parallel.cfg` actually
send, as the counting wrapper :mod:`wan.parallel.comm` reports them), Ulysses degree ``n``,
``L_pad`` = ``L`` rounded up to a multiple of ``n``, ``e`` bytes per element of the compute dtype:

- per self-attention (every main and VACE block): four all-to-alls (q, k, v in, the output back),
  each ``(L_pad / n) d e (n - 1) / n``;
- per forward: the all-gather of the head's output, ``(L_pad / n) c 4 (n - 1)`` with
  ``c = out_dim * prod(patch_size)`` values per token in float32;
- CFG parallel, per step: the all-gather of the stacked predictions, ``s * C F H W * 4 * (g - 1)``
  for ``g`` cfg ranks and ``s = ceil(passes / g)`` slots.

Speed-up model (:func:`predict`), assumptions:

- one step = the passes of classifier-free guidance (2) over the DiT; the VAE, text encoder and
  sampler are outside the model (they are seconds against minutes of denoising);
- compute runs at ``mfu`` of the GPU's dense bf16 peak (H100 SXM: 989 TFLOP/s; ``mfu`` 0.45, about
  what FlashAttention-heavy video DiTs reach), equally for one GPU and for a slice on each of
  ``n``; the work divides exactly by the number of GPUs except the text and image k/v projections
  of cross-attention, which every Ulysses rank computes whole, and the padding to ``L_pad``;
- communication is not overlapped with compute (Ulysses' all-to-alls sit between the projections
  and the attention that needs them, as in the official code): time = bytes / bandwidth + latency
  per collective; bandwidth is what one GPU sends per direction: NVLink (H100 SXM, NVSwitch)
  about 450 GB/s effective, PCIe Gen5 x16 through host or switch about 25 GB/s effective for an
  all-to-all; latency 20 us (NVLink) and 50 us (PCIe) per collective;
- CFG parallel and Ulysses compose as ``g x n`` GPUs: each cfg group runs ``passes / g`` forwards of
  a ``1/n`` slice; the prediction's all-gather is one more collective per step;
- FSDP is not modelled (its all-gathers overlap with the previous block's compute when prefetched
  and it changes memory, not speed, to first order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

TEXT_TOKENS = 512
BF16 = 2
FLOAT32 = 4


@dataclass(frozen=True)
class Hardware:
    """One GPU and its link to the others."""

    name: str
    peak_flops: float        # dense bf16 FLOP/s
    mfu: float               # fraction of the peak the DiT reaches
    bandwidth: float         # bytes/s one GPU sends per direction
    latency: float           # seconds per collective

    @property
    def flops(self) -> float:
        return self.peak_flops * self.mfu


H100_NVLINK = Hardware("H100 SXM over NVLink", 989e12, 0.45, 450e9, 20e-6)
H100_PCIE = Hardware("H100 over PCIe", 989e12, 0.45, 25e9, 50e-6)


def video_tokens(frames: int, height: int, width: int, vae_stride: Sequence[int] = (4, 8, 8),
                 patch_size: Sequence[int] = (1, 2, 2)) -> int:
    """DiT tokens of a video: latent frames ``(frames - 1) / 4 + 1`` x the latent grid / patch
    (Wan 2.2 TI2V-5B: ``vae_stride`` (4, 16, 16))."""
    f = (frames - 1) // vae_stride[0] + 1
    return (f // patch_size[0]) * (height // vae_stride[1] // patch_size[1]) * (width // vae_stride[2] // patch_size[2])


def _get(cfg: Any, name: str, default=None):
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def block_flops(cfg: Any, tokens: int, text_tokens: int = TEXT_TOKENS, image_tokens: int = 0) -> dict[str, float]:
    """FLOPs of one block by part: ``parallel`` (divides over Ulysses ranks) and ``replicated``
    (the cross-attention k/v projections of text and image tokens, which each rank computes)."""
    d, f, L = _get(cfg, "dim"), _get(cfg, "ffn_dim"), tokens
    ctx = text_tokens + image_tokens
    parallel = 8 * L * d * d + 4 * L * L * d + 4 * L * d * d + 4 * L * ctx * d + 4 * L * d * f
    replicated = 4 * ctx * d * d
    return {"parallel": float(parallel), "replicated": float(replicated)}


def blocks_per_forward(cfg: Any, vace: bool = False) -> int:
    """Blocks one forward runs: the main blocks, plus the VACE blocks with a control input."""
    return _get(cfg, "num_layers") + (len(_get(cfg, "vace_layers", ()) or ()) if vace else 0)


def forward_flops(cfg: Any, tokens: int, text_tokens: int = TEXT_TOKENS, image_tokens: int = 0,
                  vace: bool = False) -> float:
    """FLOPs of one DiT forward (batch 1)."""
    b = block_flops(cfg, tokens, text_tokens, image_tokens)
    return blocks_per_forward(cfg, vace) * (b["parallel"] + b["replicated"])


def step_flops(cfg: Any, tokens: int, passes: int = 2, **kwargs) -> float:
    """FLOPs of one denoising step: ``passes`` forwards (2 with classifier-free guidance)."""
    return passes * forward_flops(cfg, tokens, **kwargs)


# ---------------------------------------------------------------------------------------------
# Bytes


def ulysses_block_bytes(cfg: Any, tokens: int, degree: int, elem_bytes: int = BF16, batch: int = 1) -> int:
    """Bytes one rank sends in one self-attention: 4 all-to-alls of its [B, L_pad/n, d] slice."""
    if degree == 1:
        return 0
    local = math.ceil(tokens / degree)
    per = batch * local * _get(cfg, "dim") * elem_bytes
    return 4 * per * (degree - 1) // degree


def ulysses_forward_bytes(cfg: Any, tokens: int, degree: int, elem_bytes: int = BF16, batch: int = 1,
                          vace: bool = False) -> dict[str, int]:
    """Bytes one rank sends in one forward: ``all_to_all`` (every self-attention) and
    ``all_gather`` (the head's float32 output), as :class:`~wan.parallel.comm.CommCounter` keys."""
    if degree == 1:
        return {"all_to_all": 0, "all_gather": 0}
    local = math.ceil(tokens / degree)
    head = batch * local * _get(cfg, "out_dim") * math.prod(_get(cfg, "patch_size", (1, 2, 2))) * FLOAT32
    return {"all_to_all": blocks_per_forward(cfg, vace) * ulysses_block_bytes(cfg, tokens, degree, elem_bytes, batch),
            "all_gather": head * (degree - 1)}


def ulysses_forward_calls(cfg: Any, degree: int, vace: bool = False) -> dict[str, int]:
    """Collectives per forward: 4 all-to-alls per self-attention, one all-gather."""
    if degree == 1:
        return {"all_to_all": 0, "all_gather": 0}
    return {"all_to_all": 4 * blocks_per_forward(cfg, vace), "all_gather": 1}


def cfg_step_bytes(latent_shape: Sequence[int], cfg_size: int = 2, passes: int = 2, elem_bytes: int = FLOAT32) -> int:
    """Bytes one rank sends per step with CFG parallel: its stacked predictions to the other cfg
    ranks (nothing when a step has a single pass)."""
    if cfg_size == 1 or passes <= 1:
        return 0
    slots = math.ceil(passes / cfg_size)
    return slots * math.prod(latent_shape) * elem_bytes * (cfg_size - 1)


# ---------------------------------------------------------------------------------------------
# Time


@dataclass(frozen=True)
class Prediction:
    gpus: int
    cfg_size: int
    ulysses_size: int
    compute_s: float      # per step, per GPU
    comm_s: float         # per step, on the critical path
    single_s: float       # per step on one GPU
    hardware: str

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s

    @property
    def speedup(self) -> float:
        return self.single_s / self.step_s


def predict(cfg: Any, tokens: int, latent_shape: Sequence[int], hw: Hardware, cfg_size: int = 1,
            ulysses_size: int = 1, passes: int = 2, text_tokens: int = TEXT_TOKENS, image_tokens: int = 0,
            vace: bool = False, elem_bytes: int = BF16) -> Prediction:
    """Step time and speed-up on ``cfg_size x ulysses_size`` GPUs against one (see the module
    docstring for the assumptions)."""
    n, g = ulysses_size, cfg_size
    blocks = blocks_per_forward(cfg, vace)
    one = block_flops(cfg, tokens, text_tokens, image_tokens)
    single = passes * blocks * (one["parallel"] + one["replicated"]) / hw.flops
    # each rank's slice: L_pad / n queries against L keys for attention, L_pad / n tokens elsewhere
    padded = math.ceil(tokens / n) * n
    sliced = block_flops(cfg, padded, text_tokens, image_tokens)
    forward = blocks * (sliced["parallel"] / n + sliced["replicated"]) / hw.flops
    forwards = math.ceil(passes / g)
    fwd_bytes = ulysses_forward_bytes(cfg, tokens, n, elem_bytes, vace=vace)
    calls = ulysses_forward_calls(cfg, n, vace)
    comm = forwards * (sum(fwd_bytes.values()) / hw.bandwidth + sum(calls.values()) * hw.latency)
    if g > 1 and passes > 1:
        comm += cfg_step_bytes(latent_shape, g, passes) / hw.bandwidth + hw.latency
    return Prediction(n * g, g, n, forwards * forward, comm, single, hw.name)


def layouts(gpus: int, num_heads: int) -> list[tuple[int, int]]:
    """(cfg_size, ulysses_size) pairs that run on ``gpus`` GPUs: ulysses must divide the heads."""
    out = []
    for g in (1, 2):
        if gpus % g == 0 and num_heads % (gpus // g) == 0:
            out.append((g, gpus // g))
    return out


def best(cfg: Any, tokens: int, latent_shape: Sequence[int], gpus: int, hw: Hardware, **kwargs) -> Prediction | None:
    """The fastest layout on ``gpus`` GPUs, or None when no layout fits the heads."""
    options = [predict(cfg, tokens, latent_shape, hw, g, n, **kwargs) for g, n in layouts(gpus, _get(cfg, "num_heads"))]
    return min(options, key=lambda p: p.step_s) if options else None


def speedup_table(cfg: Any, tokens: int, latent_shape: Sequence[int], gpus: Sequence[int] = (2, 4, 8),
                  hardware: Sequence[Hardware] = (H100_NVLINK, H100_PCIE), **kwargs) -> list[Prediction]:
    """The best layout for each GPU count on each interconnect."""
    return [p for hw in hardware for n in gpus if (p := best(cfg, tokens, latent_shape, n, hw, **kwargs))]
