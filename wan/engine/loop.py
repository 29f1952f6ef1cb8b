"""The denoising loop: classifier-free guidance, Wan 2.2 expert switching, progress and cancel.

The loop follows the official scripts step for step: at integer timestep ``t`` the model (for
Wan 2.2 A14B: the high-noise expert when ``t >= boundary * 1000``, else the low-noise expert,
each with its own guidance) predicts the flow for the prompt and for the negative prompt,
``flow = uncond + g * (cond - uncond)``, and the sampler moves the latent to the next step.
Cancel is checked between steps, so a cancel takes effect within one step.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch


class Cancelled(Exception):
    """The generation was cancelled between two steps; nothing was written."""


@dataclass(frozen=True)
class StepInfo:
    """Progress of one finished step, given to the progress callback."""

    step: int            # 1-based
    total: int
    timestep: float
    expert: str          # "transformer", or "high_noise" / "low_noise" for Wan 2.2 A14B
    guidance: float
    elapsed: float       # seconds since the loop started
    eta: float           # seconds left, from the mean step time so far
    latent: torch.Tensor | None = None  # the current latent, for previews (not copied: do not modify)


@dataclass(frozen=True)
class ExpertPlan:
    """Which network and guidance run at a timestep."""

    boundary: float | None         # None: one network
    guidance: float                # low-noise expert (or the only network)
    guidance_high_noise: float | None = None

    def at(self, t: float) -> tuple[str, float]:
        """(expert name, guidance) at integer timestep ``t``: the reference rule t >= boundary*1000."""
        if self.boundary is None:
            return "transformer", self.guidance
        if t >= self.boundary * 1000:
            return "high_noise", self.guidance_high_noise
        return "low_noise", self.guidance


class CancelToken:
    """Set from any thread to stop a generation at the next step boundary."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def denoise(networks: Mapping[str, Callable], sampler, latent: torch.Tensor, cond: dict, uncond: dict,
            plan: ExpertPlan, conditioning, *, start: int = 0,
            progress: Callable[[StepInfo], None] | None = None,
            cancel: CancelToken | None = None) -> torch.Tensor:
    """Runs the sampler's steps from ``start`` and returns the final latent [C, F, H, W].

    Args:
        networks: expert name -> DiT ("transformer", or "high_noise" and "low_noise").
        sampler: from ``wan.engine.samplers.make_sampler``.
        latent: the starting latent [C, F, H, W] (noise, or noised input for video-to-video).
        cond, uncond: DiT keyword arguments of the two passes (``context`` and the task inputs).
        conditioning: the task's :class:`~wan.engine.conditioning.Conditioning` (per-token
            timesteps and first-frame replacement of TI2V).
    """
    steps = len(sampler.timesteps)
    begin = time.perf_counter()
    for i in range(start, steps):
        if cancel is not None and cancel.cancelled:
            raise Cancelled(f"cancelled before step {i + 1} of {steps}")
        t = sampler.timesteps[i]
        expert, guidance = plan.at(float(t))
        dit = networks[expert]
        timestep = conditioning.token_timesteps(t.to(latent.device), dit.config.patch_size)
        x = latent[None]
        with torch.inference_mode():
            flow = dit(x, timestep, **cond)[0]
            if guidance != 1.0:  # at 1 the negative pass cannot change the result
                flow_u = dit(x, timestep, **uncond)[0]
                flow = flow_u + guidance * (flow - flow_u)
            latent = sampler.step(flow, i, latent)
            if conditioning.fixed_mask is not None:
                latent = (1 - conditioning.fixed_mask) * conditioning.fixed_latent + conditioning.fixed_mask * latent
        if progress is not None:
            done = i + 1 - start
            elapsed = time.perf_counter() - begin
            progress(StepInfo(step=i + 1, total=steps, timestep=float(t), expert=expert, guidance=guidance,
                              elapsed=elapsed, eta=elapsed / done * (steps - i - 1), latent=latent))
    return latent
