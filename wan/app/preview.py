"""Cheap previews of a latent while a job runs: no VAE, just a false-colour picture.

The latent's channels are projected onto their three main directions (an SVD of the channels over
the pixels of one frame), which shows the layout of the scene as it forms, at the latent's size
upscaled. It costs a [C, C] eigen-decomposition per preview: nothing next to a denoising step.
"""

from __future__ import annotations

import numpy as np
import torch


def latent_preview(latent: torch.Tensor, scale: int | None = None) -> np.ndarray:
    """[C, F, H, W] latent -> [H*scale, W*scale, 3] uint8 picture of its middle frame; the default
    scale is the VAE's 8, more for small latents so the picture is at least 256 pixels across."""
    frame = latent[:, latent.shape[1] // 2].detach().float().cpu()  # [C, H, W]
    c, h, w = frame.shape
    scale = scale or max(8, 256 // max(h, w))
    pixels = frame.reshape(c, h * w)
    pixels = pixels - pixels.mean(dim=1, keepdim=True)
    cov = pixels @ pixels.T / max(1, h * w - 1)                # [C, C]
    _, vectors = torch.linalg.eigh(cov.double())
    basis = vectors[:, -3:].flip(1).float()                     # main three directions first
    rgb = (basis.T @ pixels).reshape(3, h, w)
    lo = rgb.amin(dim=(1, 2), keepdim=True)
    hi = rgb.amax(dim=(1, 2), keepdim=True)
    rgb = (rgb - lo) / (hi - lo).clamp_min(1e-6)
    img = (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return img.repeat(scale, axis=0).repeat(scale, axis=1)
