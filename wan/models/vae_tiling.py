"""Spatial tiling of VAE encode/decode: overlapping tiles blended linearly in the overlaps.

Tiling bounds the memory of large frames. It is not exact: convolutions see zero padding at tile
borders, so outputs differ near the seams (the blend hides the steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch



@dataclass(frozen=True)
class TileConfig:
    """Spatial tiling, in pixels: tiles of ``tile`` x ``tile`` overlapping by ``overlap``.

    Both are rounded down to multiples of the VAE's spatial stride. Each tile runs the full causal
    pass on its own; the overlaps are blended with linear ramps.
    """

    tile: int = 256
    overlap: int = 64

    def __post_init__(self):
        if self.tile <= 0 or self.overlap < 0 or self.overlap >= self.tile:
            raise ValueError(f"TileConfig(tile={self.tile}, overlap={self.overlap}): expected "
                             f"tile > 0 and 0 <= overlap < tile")


def tile_spans(total: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) spans of width ``tile`` covering [0, total), each overlapping the previous
    by at least ``overlap``; the last one is shifted back to end at ``total``."""
    if tile >= total:
        return [(0, total)]
    step = tile - overlap
    starts = list(range(0, total - tile, step)) + [total - tile]
    return [(s, s + tile) for s in starts]


def _ramp_weights(spans: list[tuple[int, int]], k: int, scale: int, like: torch.Tensor) -> torch.Tensor:
    """Blend weights along one axis for span ``k`` (output units): linear ramps over the parts
    shared with the neighbours, 1 elsewhere."""
    s, e = spans[k]
    n = (e - s) * scale
    w = torch.ones(n, dtype=torch.float32, device=like.device)
    if k > 0:
        lead = (spans[k - 1][1] - s) * scale
        w[:lead] = torch.arange(1, lead + 1, dtype=torch.float32, device=like.device) / (lead + 1)
    if k + 1 < len(spans):
        tail = (e - spans[k + 1][0]) * scale
        w[n - tail:] = torch.minimum(
            w[n - tail:], torch.arange(tail, 0, -1, dtype=torch.float32, device=like.device) / (tail + 1))
    return w


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
              in_scale: int, out_scale: int) -> torch.Tensor:
    """Applies ``fn`` to overlapping spatial tiles of ``x`` and blends the results linearly.

    Tiles are laid on a grid of latent pixels: one grid unit is ``in_scale`` pixels of ``x`` and
    ``out_scale`` pixels of the output (encode: stride and 1; decode: 1 and stride).

    Args:
        fn: [B, C, T, h, w] -> [B, C', T', h/in_scale*out_scale, w/in_scale*out_scale].
        x: [B, C, T, H, W] with H, W multiples of ``in_scale``.
        tile, overlap: tile size and overlap in grid units.
    """
    gh, gw = x.shape[3] // in_scale, x.shape[4] // in_scale
    hs, ws = tile_spans(gh, tile, overlap), tile_spans(gw, tile, overlap)
    if len(hs) == 1 and len(ws) == 1:
        return fn(x)
    acc = weight = None
    for i, (h0, h1) in enumerate(hs):
        for j, (w0, w1) in enumerate(ws):
            part = fn(x[:, :, :, h0 * in_scale:h1 * in_scale, w0 * in_scale:w1 * in_scale])
            if acc is None:
                b, c, t = part.shape[:3]
                acc = part.new_zeros((b, c, t, gh * out_scale, gw * out_scale), dtype=torch.float32)
                weight = part.new_zeros((gh * out_scale, gw * out_scale), dtype=torch.float32)
            m = _ramp_weights(hs, i, out_scale, part)[:, None] * _ramp_weights(ws, j, out_scale, part)[None, :]
            ys, xs = slice(h0 * out_scale, h1 * out_scale), slice(w0 * out_scale, w1 * out_scale)
            acc[..., ys, xs].add_(part.float() * m)
            weight[ys, xs].add_(m)
            del part
    return acc.div_(weight)


