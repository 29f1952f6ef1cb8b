"""Wan 2.1 VAE (official ``wan/modules/vae.py``): z_dim 16, compression 4x8x8.

Official size: dim 96, dim_mult [1, 2, 4, 4], 2 residual blocks per stage, temporal downsampling
in stages 1 and 2 ([False, True, True]), no attention outside the middle blocks.

Module names equal the official keys: ``encoder.conv1``, ``encoder.downsamples.N`` (a flat list of
residual blocks and resamplers), ``encoder.middle.0/1/2``, ``encoder.head.0/2``, ``conv1``,
``conv2``, ``decoder.conv1``, ``decoder.middle``, ``decoder.upsamples.N``, ``decoder.head.0/2``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from wan.models.vae_base import CausalVAE
from wan.models.vae_blocks import (CausalEncoder, CausalCache, CausalConv3d, Resample, ResidualBlock, causal_conv_frame,
                                  make_head, make_middle, run_head_frame, stream_frames,
                                  time_slice_major_)

LATENTS_MEAN_21 = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD_21 = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


class Encoder21(CausalEncoder):
    """[B, 3, T, H, W] -> [B, 2*z_dim, 1 + (T-1)/4, H/8, W/8] (one chunk at a time)."""

    def __init__(self, dim: int, z2: int, dim_mult: list[int], num_res_blocks: int,
                 temporal: list[bool]):
        super().__init__()
        dims = [dim * m for m in [1] + dim_mult]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if temporal[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = make_middle(dims[-1])
        self.head = make_head(dims[-1], z2)


class Decoder21(nn.Module):
    """[B, z_dim, 1, h, w] (one latent frame) -> [B, 3, 1 or 4, 8h, 8w], frame at a time.

    Stage i has ``num_res_blocks + 1`` residual blocks then an upsampler; upsamplers halve the
    channels, so stages after the first take ``dims[i] // 2`` input channels.
    """

    def __init__(self, dim: int, z_dim: int, dim_mult: list[int], num_res_blocks: int,
                 temporal: list[bool]):
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1]] + dim_mult[::-1]]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = make_middle(dims[0])
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                blocks.append(Resample(cout, "upsample3d" if temporal[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = make_head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """Frame path (see ``vae_blocks``): every stage runs one frame at a time, so the working
        set is one frame per stage and no history frame is ever copied."""
        frame = x[:, :, 0].contiguous(memory_format=torch.channels_last)
        frame = causal_conv_frame(self.conv1, frame, cache)
        stages = [b.forward_frame for b in (*self.middle, *self.upsamples)]
        stages.append(lambda y, c: run_head_frame(self.head, y, c))
        frames = stream_frames(stages, frame, cache, [])
        return torch.stack(frames, dim=2)


class WanVAE21(CausalVAE):
    """Wan 2.1 VAE. See ``CausalVAE`` for ``encode`` / ``decode``."""

    version = "2.1"

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult: list[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, temporal_downsample: list[bool] = (False, True, True)):
        super().__init__()
        if z_dim != len(LATENTS_MEAN_21):
            raise ValueError(f"Wan 2.1 VAE: z_dim={z_dim}, expected {len(LATENTS_MEAN_21)}")
        dim_mult, temporal = list(dim_mult), list(temporal_downsample)
        self.config = dict(dim=dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=num_res_blocks,
                           temporal_downsample=temporal)
        self.z_dim = z_dim
        self.stride = (2 ** sum(temporal), 2 ** (len(dim_mult) - 1), 2 ** (len(dim_mult) - 1))
        self.latents_mean, self.latents_std = LATENTS_MEAN_21, LATENTS_STD_21
        self.encoder = Encoder21(dim, z_dim * 2, dim_mult, num_res_blocks, temporal)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder21(dim, z_dim, dim_mult, num_res_blocks, temporal[::-1])

    def prepare_weights_(self) -> WanVAE21:
        """The decoder runs its causal convs one time slice at a time: store those slices
        contiguously (see ``time_slice_major_``)."""
        for module in self.decoder.modules():
            if isinstance(module, CausalConv3d):
                time_slice_major_(module)
        return self
