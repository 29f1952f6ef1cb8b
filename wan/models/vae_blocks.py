"""Pieces shared by the Wan 2.1 and 2.2 VAEs: causal convolutions with a per-call frame cache,
the L2 "RMS_norm", residual / attention / resampling blocks, the chunked encode/decode driver and
spatial tiling.

Module and parameter names follow the official Wan code (``wan/modules/vae.py``) so official and
ComfyUI checkpoints load without renaming (``residual.0/2/3/6``, ``shortcut``, ``resample.1``,
``time_conv``, ``norm``/``to_qkv``/``proj``).

Causal streaming. Every temporal 3-tap convolution sees, in front of its current input, the last
two input frames of the previous chunk (zeros at the start of the video). Those frames live in a
``CausalCache`` created for one encode/decode call and passed down; no module keeps call state,
so several requests may share one model.

Speed and memory (all exact reformulations of the reference maths):
- activations are kept channels-last (``channels_last_3d``), the layout the CPU/GPU convolution
  kernels prefer, so no layout conversion happens around each convolution;
- spatial zero padding is done inside the convolution, not by a padded copy;
- "norm -> SiLU -> causal conv" writes the normalised activation straight into the conv's input
  buffer behind the cached frames, instead of ``cat([cache, x])`` followed by ``pad``;
- the decoder streams frame by frame through its full-resolution stages (see
  ``run_streamed``), so the working set is one frame, not one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE_T = 2  # frames of history a 3-tap causal conv needs
CHANNELS_LAST = torch.channels_last_3d


class CausalCache:
    """State of one causal encode/decode pass, keyed by module.

    For each causal conv: its last ``time_pad`` input frames. For a temporal resampler: a marker
    that its first chunk has been seen. ``first_chunk`` is True while the first chunk (frame 0)
    goes through the network.
    """

    def __init__(self) -> None:
        self.frames: dict[nn.Module, torch.Tensor | None] = {}
        self.first_chunk = True

    def seen(self, module: nn.Module) -> bool:
        return module in self.frames

    def get(self, module: nn.Module) -> torch.Tensor | None:
        return self.frames.get(module)

    def put(self, module: nn.Module, frames: torch.Tensor | None) -> None:
        self.frames[module] = frames


# ---------------------------------------------------------------------------------------------
# Layers


class CausalConv3d(nn.Conv3d):
    """3D convolution that is causal in time: it pads ``2*padding_t`` frames in front only.

    The frames in front are the cached frames of the previous chunk, or zeros. Spatial padding
    is symmetric and done by the convolution itself.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.time_pad = 2 * self.padding[0]
        self.padding = (0, self.padding[1], self.padding[2])

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """x [B, C, T, H, W] -> [B, C_out, T', H', W']; with a cache, continues the previous chunk."""
        if self.time_pad == 0:
            return super().forward(x)
        history = cache.get(self) if cache is not None else None
        parts = [history if history is not None else _zero_frames(x, self.time_pad), x]
        buf = torch.cat(parts, dim=2)
        if cache is not None:
            cache.put(self, buf[:, :, -self.time_pad:].clone())
        return super().forward(buf)

    def forward_padded(self, buf: torch.Tensor) -> torch.Tensor:
        """Runs on an input that already holds the ``time_pad`` history frames in front."""
        return super().forward(buf)


def _zero_frames(x: torch.Tensor, n: int) -> torch.Tensor:
    b, c, _, h, w = x.shape
    return torch.empty((b, c, n, h, w), dtype=x.dtype, device=x.device, memory_format=CHANNELS_LAST).zero_()


class RMS_norm(nn.Module):  # noqa: N801 (official name)
    """L2 normalisation over channels times sqrt(C) times a learned gain.

    Note: this is ``F.normalize`` (eps 1e-12 on the L2 norm), not a classic RMSNorm with eps.
    ``gamma`` has shape [C, 1, 1, 1] for videos or [C, 1, 1] for images (official layout).
    """

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, ...] -> same shape; ``out`` (same shape) receives the result if given."""
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)
        y = torch.div(x, norm, out=out) if out is not None else x / norm
        # scale and gamma folded into one [C] multiplier: one pass over the activation, not two.
        return y.mul_(self.gamma * self.scale)


def norm_silu_causal_conv(norm: RMS_norm, conv: CausalConv3d, x: torch.Tensor,
                          cache: CausalCache) -> torch.Tensor:
    """``conv(silu(norm(x)))`` with causal history, writing the activation once.

    The activation is computed straight into the conv's input buffer after the history frames,
    which replaces the reference's clone + cat + pad copies by one write.
    """
    pad = conv.time_pad
    b, c, t, h, w = x.shape
    buf = torch.empty((b, c, pad + t, h, w), dtype=x.dtype, device=x.device, memory_format=CHANNELS_LAST)
    history = cache.get(conv)
    if history is None:
        buf[:, :, :pad].zero_()
    else:
        buf[:, :, :pad].copy_(history)
    body = buf[:, :, pad:]
    norm(x, out=body)
    F.silu(body, inplace=True)
    cache.put(conv, buf[:, :, -pad:].clone())
    return conv.forward_padded(buf)


class ResidualBlock(nn.Module):
    """[norm, SiLU, conv3, norm, SiLU, dropout, conv3] + shortcut (1x1x1 conv when dims differ).

    Keys: ``residual.0.gamma``, ``residual.2.*``, ``residual.3.gamma``, ``residual.6.*``,
    ``shortcut.*``.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """x [B, in_dim, T, H, W] -> [B, out_dim, T, H, W]."""
        r = self.residual
        h = self.shortcut(x)
        y = norm_silu_causal_conv(r[0], r[2], x, cache)
        y = norm_silu_causal_conv(r[3], r[6], y, cache)
        return y.add_(h)  # in place on the fresh conv output: no extra activation


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (over h*w positions), plus identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """x [B, C, T, H, W] -> same shape."""
        b, c, t, h, w = x.shape
        frames = to_frames(x)
        qkv = self.to_qkv(self.norm(frames))                       # [BT, 3C, H, W]
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).transpose(-1, -2)  # [BT, 1, HW, 3C]
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)                 # [BT, 1, HW, C]
        y = y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return from_frames(self.proj(y), b).add_(x)


def to_frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W] (a view for channels-last input)."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def from_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W] (a view for channels-last input)."""
    bt, c, h, w = x.shape
    return x.reshape(b, bt // b, c, h, w).transpose(1, 2)


class Upsample(nn.Upsample):
    """Nearest-exact upsampling computed in float32 (the reference's bfloat16 workaround)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class Resample(nn.Module):
    """Spatial x2 up/down sampling, optionally with a temporal x2 (``time_conv``).

    Args:
        dim: input channels.
        mode: ``upsample2d``, ``upsample3d``, ``downsample2d`` or ``downsample3d``.
        out_dim: channels after an upsample conv (``dim // 2`` in Wan 2.1, ``dim`` in Wan 2.2).
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, out_dim or dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"Resample mode {mode!r}: expected upsample2d/3d or downsample2d/3d")

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """x [B, C, T, H, W] -> [B, C', T', 2H, 2W] or [B, C, T', H/2, W/2]."""
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        b = x.shape[0]
        x = from_frames(self.resample(to_frames(x)), b)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _double_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # The reference leaves the first chunk (frame 0) alone; from the second chunk on,
        # time_conv runs with zero history and each frame becomes two.
        if not cache.seen(self):
            cache.put(self, None)
            return x
        b, c, t, h, w = x.shape
        y = self.time_conv(x, cache)                                # [B, 2C, T, H, W]
        # channel halves (first C, second C) become frames (2i, 2i+1)
        out = torch.empty((b, c, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=CHANNELS_LAST)
        out[:, :, 0::2] = y[:, :c]
        out[:, :, 1::2] = y[:, c:]
        return out

    def _halve_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # First chunk: passes through, its last frame is kept. Later chunks: stride-2 time conv
        # over [last frame of the previous chunk, x].
        previous = cache.get(self)
        cache.put(self, x[:, :, -1:].clone())
        if previous is None:
            return x
        return self.time_conv(torch.cat([previous, x], dim=2))


def make_head(dim: int, out: int) -> nn.Sequential:
    """Output head of encoders and decoders: [RMS_norm, SiLU, CausalConv3d 3x3x3] (keys head.0/2)."""
    return nn.Sequential(RMS_norm(dim, images=False), nn.SiLU(), CausalConv3d(dim, out, 3, padding=1))


def make_middle(dim: int) -> nn.Sequential:
    """Middle of encoders and decoders: residual block, attention, residual block (keys middle.0/1/2)."""
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def run_head(head: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    """Output head [RMS_norm, SiLU, CausalConv3d]."""
    return norm_silu_causal_conv(head[0], head[2], x, cache)


def run_conv_in(conv: CausalConv3d, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    """First causal conv; switches the activations to the channels-last layout."""
    return conv(x.contiguous(memory_format=CHANNELS_LAST), cache)


# ---------------------------------------------------------------------------------------------
# Streaming through a list of stages

Stage = Callable[[torch.Tensor, CausalCache], torch.Tensor]


def run_streamed(stages: Sequence[Stage], x: torch.Tensor, cache: CausalCache,
                 stream_from: int) -> torch.Tensor:
    """Runs ``stages`` in order; from stage ``stream_from`` on, one frame at a time.

    Every stage is causal with its history in ``cache``, so pushing the frames of a chunk one by
    one through the remaining stages gives the same result as pushing the whole chunk, while only
    one frame of the large high-resolution activations is alive at a time.
    """
    for i, stage in enumerate(stages):
        if i >= stream_from and x.shape[2] > 1:
            outs = [run_streamed(stages[i:], f, cache, 0) for f in x.split(1, dim=2)]
            return torch.cat(outs, dim=2)
        x = stage(x, cache)
    return x


# ---------------------------------------------------------------------------------------------
# Spatial tiling


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


# ---------------------------------------------------------------------------------------------
# The encode/decode driver shared by both versions


class CausalVAE(nn.Module):
    """Public API of a Wan VAE: chunked causal encode/decode with latent normalisation.

    Subclasses build ``encoder``, ``conv1`` (z_dim*2 -> z_dim*2, 1x1x1), ``conv2`` (z_dim -> z_dim,
    1x1x1), ``decoder`` and set ``version``, ``z_dim``, ``stride``, ``patch``, ``latents_mean`` and
    ``latents_std`` (plain Python lists: the model keeps no buffers outside its state dict).
    """

    version: str
    z_dim: int
    stride: tuple[int, int, int]
    patch: int = 1
    latents_mean: list[float]
    latents_std: list[float]
    encoder: nn.Module
    decoder: nn.Module
    conv1: CausalConv3d
    conv2: CausalConv3d

    # -- public ------------------------------------------------------------------------------

    def encode(self, video: torch.Tensor, tile: TileConfig | None = None) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of the spatial stride
        -> normalised latents ``(mu - mean) / std`` [B, z_dim, 1 + k, H/s, W/s], float32."""
        st, ss = self.stride[0], self.stride[1]
        if video.dim() != 5 or video.shape[1] != 3 or video.shape[2] % st != 1 \
                or video.shape[3] % ss or video.shape[4] % ss:
            raise ValueError(
                f"Wan {self.version} VAE encode: video has shape {tuple(video.shape)}; expected "
                f"[B, 3, T, H, W] with T = 1 + {st}k and H, W multiples of {ss}")
        x = video.to(self.conv1.weight.dtype)
        if tile is not None:
            mu = run_tiled(self._encode_mu, x, *self._tile_units(tile), in_scale=ss, out_scale=1)
        else:
            mu = self._encode_mu(x)
        mean, inv_std = self._latent_constants(mu.device)
        return (mu.float() - mean) * inv_std

    def decode(self, z: torch.Tensor, tile: TileConfig | None = None) -> torch.Tensor:
        """z [B, z_dim, F, h, w] normalised latents -> video [B, 3, 1 + 4(F-1), h*s, w*s] in
        [-1, 1], float32."""
        if z.dim() != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"Wan {self.version} VAE decode: latents have shape {tuple(z.shape)}; "
                             f"expected [B, {self.z_dim}, F, h, w]")
        mean, inv_std = self._latent_constants(z.device)
        z = (z.float() / inv_std + mean).to(self.conv2.weight.dtype)
        if tile is not None:
            video = run_tiled(self._decode_frames, z, *self._tile_units(tile), in_scale=1,
                              out_scale=self.stride[1])
        else:
            video = self._decode_frames(z)
        return video.float().clamp_(-1.0, 1.0)

    # -- chunked passes ----------------------------------------------------------------------

    def _encode_mu(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] -> raw mu [B, z_dim, F, h, w]: frame 0 alone, then chunks of 4."""
        x = patchify(x, self.patch)
        cache = CausalCache()
        outs = []
        for start in range(0, x.shape[2], self.stride[0]):
            chunk = x[:, :, :1] if start == 0 else x[:, :, start - self.stride[0] + 1:start + 1]
            cache.first_chunk = start == 0
            outs.append(self.encoder(chunk, cache))
        h = torch.cat(outs, dim=2)
        return self.conv1(h)[:, :self.z_dim].contiguous()

    def _decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        """[B, z_dim, F, h, w] raw latents -> [B, 3, 1 + 4(F-1), H, W], one latent frame at a time,
        written into one preallocated output (no growing concatenation)."""
        x = self.conv2(z)
        cache = CausalCache()
        out, pos = None, 0
        for i in range(x.shape[2]):
            cache.first_chunk = i == 0
            y = unpatchify(self.decoder(x[:, :, i:i + 1], cache), self.patch)
            if out is None:
                b, c, _, hh, ww = y.shape
                frames = 1 + self.stride[0] * (x.shape[2] - 1)
                out = torch.empty((b, c, frames, hh, ww), dtype=y.dtype, device=y.device)
            out[:, :, pos:pos + y.shape[2]] = y
            pos += y.shape[2]
            del y
        return out

    # -- helpers -----------------------------------------------------------------------------

    def _latent_constants(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.latents_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(self.latents_std, dtype=torch.float32, device=device).view(shape)
        return mean, 1.0 / std  # the reference multiplies by 1/std and divides by it to undo

    def _tile_units(self, tile: TileConfig) -> tuple[int, int]:
        s = self.stride[1]
        if tile.tile < s:
            raise ValueError(f"TileConfig.tile={tile.tile}: must be at least the spatial stride {s}")
        return tile.tile // s, tile.overlap // s


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H*p, W*p] -> [B, C*p*p, T, H, W], channels ordered (c, w-offset, h-offset)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of ``patchify``: [B, C*p*p, T, H, W] -> [B, C, T, H*p, W*p]."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    c = cpp // (p * p)
    x = x.reshape(b, c, p, p, t, h, w)  # (c, w-offset r, h-offset q)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c, t, h * p, w * p)
