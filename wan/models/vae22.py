"""Wan 2.2 VAE (official ``wan/modules/vae2_2.py``): z_dim 48, compression 4x16x16.

The video is patchified 2x2 (3 -> 12 channels) before an 8x8 encoder and unpatchified after the
decoder. Each encoder stage is a ``Down_ResidualBlock`` (residual blocks + resampler, plus a
parameter-free space/time-to-channel average shortcut, ``AvgDown3D``); each decoder stage an
``Up_ResidualBlock`` (``num_res_blocks + 1`` residual blocks + resampler, plus a parameter-free
channel-to-space/time duplication shortcut, ``DupUp3D``). Upsampling convs keep the channel count.

Official size: encoder dim 160, decoder dim 256, dim_mult [1, 2, 4, 4], 2 residual blocks,
temporal downsampling [False, True, True]. Keys: ``encoder.downsamples.I.downsamples.J...``,
``decoder.upsamples.I.upsamples.J...`` plus the same top-level names as Wan 2.1.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan.models.vae_base import CausalVAE
from wan.models.vae_blocks import (CausalEncoder, CausalCache, CausalConv3d, Resample, ResidualBlock, make_head, make_middle,
                                  run_conv_in, run_head, run_streamed)

LATENTS_MEAN_22 = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667]
LATENTS_STD_22 = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]

PATCH = 2
IMAGE_CHANNELS = 3 * PATCH * PATCH


class AvgDown3D(nn.Module):
    """Parameter-free shortcut: (t, h, w) blocks of size (ft, fs, fs) folded into channels, then
    channel groups averaged down to ``out_channels``. Time is zero-padded in front to a multiple
    of ``ft`` (the first chunk has one frame)."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_channels, self.ft, self.fs = out_channels, factor_t, factor_s
        self.group = in_channels * factor_t * factor_s * factor_s // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, out, ceil(T/ft), H/fs, W/fs]."""
        ft, fs = self.ft, self.fs
        pad = (-x.shape[2]) % ft
        if pad:
            x = F.pad(x, (0, 0, 0, 0, pad, 0))
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_channels, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut: channels repeated, then unfolded into (ft, fs, fs) blocks of
    time and space. On the first chunk the first ``ft - 1`` frames are dropped (one latent frame
    decodes to one frame)."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_channels, self.ft, self.fs = out_channels, factor_t, factor_s
        self.repeats = out_channels * factor_t * factor_s * factor_s // in_channels

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, out, T*ft (minus ft-1 on the first chunk), H*fs, W*fs]."""
        ft, fs = self.ft, self.fs
        x = x.repeat_interleave(self.repeats, dim=1)
        b, _, t, h, w = x.shape
        x = x.reshape(b, self.out_channels, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first_chunk else x


class Down_ResidualBlock(nn.Module):  # noqa: N801 (official name)
    """``num_res_blocks`` residual blocks + optional downsampler, plus the AvgDown3D shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temporal else 1,
                                      factor_s=2 if down else 1)
        blocks: list[nn.Module] = []
        for _ in range(num_res_blocks):
            blocks.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if down:
            blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        y = x
        for block in self.downsamples:
            y = block(y, cache)
        return y.add_(self.avg_shortcut(x))


class Up_ResidualBlock(nn.Module):  # noqa: N801 (official name)
    """``num_res_blocks + 1`` residual blocks + optional upsampler, plus the DupUp3D shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = (DupUp3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2)
                             if up else None)
        blocks: list[nn.Module] = []
        for _ in range(num_res_blocks + 1):
            blocks.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if up:
            blocks.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim=out_dim))
        self.upsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        y = x
        for block in self.upsamples:
            y = block(y, cache)
        if self.avg_shortcut is None:
            return y
        return y.add_(self.avg_shortcut(x, cache.first_chunk))


class Encoder22(CausalEncoder):
    """[B, 12, T, H, W] (patchified) -> [B, 2*z_dim, 1 + (T-1)/4, H/8, W/8], one chunk at a time."""

    def __init__(self, dim: int, z2: int, dim_mult: list[int], num_res_blocks: int,
                 temporal: list[bool]):
        super().__init__()
        dims = [dim * m for m in [1] + dim_mult]
        last = len(dim_mult) - 1
        self.conv1 = CausalConv3d(IMAGE_CHANNELS, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*[
            Down_ResidualBlock(cin, cout, num_res_blocks, temporal=i < len(temporal) and temporal[i]
                               and i != last, down=i != last)
            for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:]))])
        self.middle = make_middle(dims[-1])
        self.head = make_head(dims[-1], z2)


class Decoder22(nn.Module):
    """[B, z_dim, 1, h, w] (one latent frame) -> [B, 12, 1 or 4, 8h, 8w] (still patchified)."""

    def __init__(self, dim: int, z_dim: int, dim_mult: list[int], num_res_blocks: int,
                 temporal: list[bool]):
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1]] + dim_mult[::-1]]
        last = len(dim_mult) - 1
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = make_middle(dims[0])
        self.upsamples = nn.Sequential(*[
            Up_ResidualBlock(cin, cout, num_res_blocks, temporal=i < len(temporal) and temporal[i]
                             and i != last, up=i != last)
            for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:]))])
        self.head = make_head(dims[-1], IMAGE_CHANNELS)
        # The stage with the last upsampler and the ones after it see 4 frames per latent frame
        # at the highest resolutions: stream them frame by frame (see run_streamed).
        up_stages = [i for i, b in enumerate(self.upsamples) if b.avg_shortcut is not None]
        self._stream_from = up_stages[-1] if up_stages else 0

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = run_conv_in(self.conv1, x, cache)
        for block in self.middle:
            x = block(x, cache)
        stages = list(self.upsamples) + [lambda y, c: run_head(self.head, y, c)]
        return run_streamed(stages, x, cache, self._stream_from)


class WanVAE22(CausalVAE):
    """Wan 2.2 VAE. See ``CausalVAE`` for ``encode`` / ``decode``."""

    version = "2.2"
    patch = PATCH

    def __init__(self, dim: int = 160, dec_dim: int = 256, z_dim: int = 48,
                 dim_mult: list[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 temporal_downsample: list[bool] = (False, True, True)):
        super().__init__()
        if z_dim != len(LATENTS_MEAN_22):
            raise ValueError(f"Wan 2.2 VAE: z_dim={z_dim}, expected {len(LATENTS_MEAN_22)}")
        dim_mult, temporal = list(dim_mult), list(temporal_downsample)
        self.config = dict(dim=dim, dec_dim=dec_dim, z_dim=z_dim, dim_mult=dim_mult,
                           num_res_blocks=num_res_blocks, temporal_downsample=temporal)
        self.z_dim = z_dim
        s = PATCH * 2 ** (len(dim_mult) - 1)
        self.stride = (2 ** sum(temporal), s, s)
        self.latents_mean, self.latents_std = LATENTS_MEAN_22, LATENTS_STD_22
        self.encoder = Encoder22(dim, z_dim * 2, dim_mult, num_res_blocks, temporal)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder22(dec_dim, z_dim, dim_mult, num_res_blocks, temporal[::-1])
