"""The flow-matching training pieces: the noisy input, the velocity target and the MSE loss.

Conventions (musubi-tuner's ``trainer_base.py`` and ``wan_train_network.py``): ``x_t = (1 - sigma) * x0 +
sigma * noise``, the DiT predicts the velocity ``noise - x0``, the loss is the element-wise squared error,
multiplied per batch item by the loss weighting, then averaged over every element. Everything here is
computed in float32.

Wan 2.2 TI2V (image to video): the first latent frame is the clean image, so its x_t is x0 and its
tokens get timestep 0, as the engine does at inference (``wan.engine.conditioning.Conditioning.
token_timesteps``). musubi does not train TI2V; DiffSynth-Studio, which does, leaves that frame out of
the loss (nothing there to predict), which ``first_frame_clean=True`` of :func:`flow_loss` does too.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _per_item(values: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Scalar or [B] -> float32 [B, 1, ..., 1] broadcastable against ``like`` [B, ...]."""
    v = torch.as_tensor(values, dtype=torch.float32, device=like.device)
    if v.ndim == 0:
        return v
    if v.shape != like.shape[:1]:
        raise ValueError(f"expected one value per batch item ({like.shape[0]}), got shape {tuple(v.shape)}")
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float,
                first_frame_clean: bool = False) -> torch.Tensor:
    """x_t = (1 - sigma) * x0 + sigma * noise, in float32.

    Args:
        x0: clean latents [B, C, F, H, W] (any [B, ...] without ``first_frame_clean``).
        noise: same shape as ``x0``.
        sigma: a scalar or [B], one noise level per batch item.
        first_frame_clean: TI2V: latent frame 0 (dim 2) stays x0.
    """
    x0, noise = x0.float(), noise.float()
    s = _per_item(sigma, x0)
    x_t = (1 - s) * x0 + s * noise
    if first_frame_clean:
        x_t[:, :, :1] = x0[:, :, :1]
    return x_t


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the DiT learns, ``noise - x0`` (float32, shape of ``x0``)."""
    return noise.float() - x0.float()


def flow_loss(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor | None = None,
              first_frame_clean: bool = False) -> torch.Tensor:
    """Scalar float32 MSE: ``mean(weighting[b] * (pred - target)**2)`` over all elements.

    As musubi: the weight multiplies each batch item's squared errors before one mean over every element
    (it is not renormalised by the weights' sum).

    Args:
        pred, target: [B, C, F, H, W] (any [B, ...] without ``first_frame_clean``).
        weighting: None or [B] per-item weights (``wan.train.timesteps.loss_weighting``).
        first_frame_clean: TI2V: leave latent frame 0 out (the mean is over the other frames).
    """
    err = (pred.float() - target.float()) ** 2
    if first_frame_clean:
        err = err[:, :, 1:]
    if weighting is not None:
        err = err * _per_item(weighting, err)
    return err.mean()


def ti2v_token_timesteps(timesteps: torch.Tensor, latent_shape: Sequence[int],
                         patch_size: Sequence[int] = (1, 2, 2)) -> torch.Tensor:
    """Per-token DiT timesteps for TI2V training: [B] -> [B, tokens], the tokens of latent frame 0 at 0.

    Tokens are ordered (frame, row, column) as the DiT's patch embedding flattens them; built as the engine
    builds them at inference: a [F, H, W] mask with frame 0 at 0, taken every ``patch_size`` step.

    Args:
        timesteps: [B] on the 0..1000 scale.
        latent_shape: the latents' shape, ending in (F, H, W).
        patch_size: the DiT's (pf, ph, pw).
    """
    f, h, w = latent_shape[-3:]
    mask = torch.ones(f, h, w, dtype=torch.float32, device=timesteps.device)
    mask[0] = 0
    mask = mask[::patch_size[0], ::patch_size[1], ::patch_size[2]].flatten()
    return mask[None, :] * timesteps.float().reshape(-1, 1)
