"""Tiny Wan VAEs for tests: seeded random weights in the official key layout.

The tiny configs keep the official structure (dim_mult [1, 2, 4, 4], 2 residual blocks, temporal
downsampling [False, True, True], z_dim 16 / 48) with small channel counts, so every key pattern
and every code path of the full-size models is present.
"""

from __future__ import annotations

import math

import torch

TINY_VAE_CONFIGS: dict[str, dict] = {
    "2.1": dict(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                temporal_downsample=[False, True, True]),
    # a decoder dim different from the encoder dim, so loaders must infer both
    "2.2": dict(dim=8, dec_dim=12, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                temporal_downsample=[False, True, True]),
}


def build_vae(version: str, **config):
    """An untrained Wan VAE of ``version`` ("2.1" or "2.2") with ``config`` (model classes' args)."""
    from wan.models.vae21 import WanVAE21
    from wan.models.vae22 import WanVAE22
    if version not in TINY_VAE_CONFIGS:
        raise ValueError(f"VAE version {version!r}: expected one of {sorted(TINY_VAE_CONFIGS)}")
    return (WanVAE21 if version == "2.1" else WanVAE22)(**config)


def tiny_vae_state_dict(version: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 weights of the tiny ``version`` VAE, official key names, deterministic in ``seed``."""
    return random_vae_state_dict(version, TINY_VAE_CONFIGS[version], seed)


def random_vae_state_dict(version: str, config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random float32 weights for a VAE of any size (e.g. the full-size one in benchmarks).

    Conv weights are drawn with std 1/sqrt(fan_in) (activations keep their scale through the
    stack), biases with std 0.05, norm gains around 1 (1 + 0.1 * noise).
    """
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_vae(version, **config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        if key.endswith("gamma"):
            t = noise.mul_(0.1).add_(1.0)
        elif key.endswith("bias"):
            t = noise.mul_(0.05)
        else:
            t = noise.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
        out[key] = t.contiguous()
    return out
