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
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from wan.optim.guidance import GuidanceSettings, StepGuidance
from wan.optim.step_cache import (StepRunner, calibrate_magcache_passes, calibrate_teacache, magcache_schedule,
                                  teacache_schedule, time_embeddings)


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
    passes: tuple[str, ...] = ()        # model passes this step ran (cond, uncond, uncond_skip, cond_skip)


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


RIFLEX_K = 6
RIFLEX_AUTO_SECONDS = 6  # Wan was trained on clips of about 5 s; past 6 s RIFLEx keeps motion coherent


@dataclass(frozen=True)
class StepSavers:
    """The step savers of one generation (from the profile, with per-job overrides).

    TeaCache is on when ``teacache_speedup`` (calibrated threshold) or ``teacache_threshold`` is
    set; it is left off for two-expert models, whose residuals change network mid-run.

    MagCache is on when ``magcache_speedup`` or ``magcache_threshold`` is set (TeaCache wins when
    both are). Its ratios come from ``magcache_ratios`` (one table for this step count, used for
    both passes) or else from ``magcache_source``, the job's view of the per-model store
    (:class:`wan.optim.magcache_tables.MagCacheJob`, bound by the engine): per-pass tables for
    the job's steps, or, when it has none yet, a recorder that computes every step.
    """

    guidance: GuidanceSettings = field(default_factory=GuidanceSettings)
    teacache_speedup: float | None = None
    teacache_threshold: float | None = None
    teacache_start: float = 0.1
    teacache_coefficients: tuple | None = None
    magcache_ratios: tuple[float, ...] | None = None  # per-step table for this step count (calibrated)
    magcache_speedup: float | None = None
    magcache_threshold: float | None = None
    magcache_max_skips: int = 2
    magcache_start: float = 0.2
    magcache_source: Any = None       # MagCacheJob: ratios(sampler, start), recorder(sampler, start), not_used(why)
    batched_cfg: bool = False
    riflex: str = "auto"             # "auto": on for clips longer than RIFLEX_AUTO_SECONDS at the model's fps

    @property
    def magcache_on(self) -> bool:
        return self.magcache_speedup is not None or self.magcache_threshold is not None

    def riflex_setting(self, latent_frames: int, frames: int, fps: int) -> tuple[int, int] | None:
        """(k, latent frames) when RIFLEx applies, k = 6 as for Wan in the RIFLEx paper and Wan2GP."""
        if self.riflex == "on" or (self.riflex == "auto" and frames > RIFLEX_AUTO_SECONDS * fps + 1):
            return (RIFLEX_K, latent_frames)
        if self.riflex not in ("auto", "on", "off"):
            raise ValueError(f"riflex: {self.riflex!r} is not allowed; auto, on or off")
        return None

    def runner(self, networks: Mapping, sampler, start: int):
        """The block runner of this generation (a StepRunner, a MagCache recorder), or None."""
        needs_runner = self.guidance.slg.mode != "none"
        schedule = None
        teacache_on = self.teacache_speedup is not None or self.teacache_threshold is not None
        if teacache_on and len(networks) == 1:
            dit = next(iter(networks.values()))
            emb = time_embeddings(dit, sampler.timesteps[start:])
            first = max(1, int(self.teacache_start * len(emb)))
            if self.teacache_threshold is not None:
                part = teacache_schedule(emb, self.teacache_threshold, self.teacache_coefficients, first)
            else:
                _, part = calibrate_teacache(emb, self.teacache_speedup, self.teacache_coefficients, first)
            schedule = [True] * start + part
            if self.magcache_on and self.magcache_source is not None:
                self.magcache_source.not_used("TeaCache is on as well, and the two do not combine")
        elif self.magcache_on:
            found = self._magcache_tables(sampler, start)
            if found is None:  # no table yet: this run computes every step and records one
                recorder = self.magcache_source.recorder(sampler, start)
                return recorder if recorder is not None else (StepRunner() if needs_runner else None)
            schedule = self._magcache_schedule(*found, start)
        if schedule is None and not needs_runner:
            return None
        return StepRunner(schedule=schedule)

    def _magcache_tables(self, sampler, start: int):
        """({pass kind: ratios [steps]}, {pass kind: forced steps}), or None: no table yet."""
        if self.magcache_ratios is not None:
            ratios = list(self.magcache_ratios)
            if len(ratios) != len(sampler.timesteps):
                raise ValueError(f"magcache ratios: {len(ratios)} values for {len(sampler.timesteps)} steps; "
                                 "calibrate for this step count")
            return {"cond": ratios, "uncond": ratios}, {}
        if self.magcache_source is None:
            raise ValueError("MagCache is on but has neither magcache_ratios nor a magcache_source "
                             "(Engine.generate binds one; see wan.optim.magcache_tables)")
        return self.magcache_source.ratios(sampler, start)

    def _magcache_schedule(self, tables: dict[str, list[float]], forced: dict[str, set[int]],
                           start: int) -> dict[str, list[bool]]:
        """Per-pass schedules over the whole run (steps before ``start`` marked computed)."""
        parts = {kind: ratios[start:] for kind, ratios in tables.items()}
        steps = len(next(iter(parts.values())))
        forced_part = {k: {i - start for i in f if i >= start} for k, f in forced.items()}
        first = max(1, int(self.magcache_start * steps))
        if self.magcache_threshold is not None:
            scheds = {k: magcache_schedule(r, self.magcache_threshold, self.magcache_max_skips, first,
                                           forced_part.get(k, ())) for k, r in parts.items()}
        else:
            _, scheds = calibrate_magcache_passes(parts, self.magcache_speedup, self.magcache_max_skips, first,
                                                  forced_part)
        return {k: [True] * start + s for k, s in scheds.items()}


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
            cancel: CancelToken | None = None, savers: StepSavers | None = None,
            on_step: Callable[[int, int, str, int | None], None] | None = None) -> torch.Tensor:
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
    savers = savers or StepSavers()
    guidance_plan = StepGuidance(savers.guidance, steps)
    runner = savers.runner(networks, sampler, start)
    if runner is not None:
        for dit in networks.values():
            dit.block_runner = runner
    try:
        return _steps(networks, sampler, latent, cond, uncond, plan, conditioning, start, progress, cancel,
                      guidance_plan, runner, savers.batched_cfg, on_step)
    finally:
        if runner is not None:
            for dit in networks.values():
                dit.block_runner = None


def _steps(networks, sampler, latent, cond, uncond, plan, conditioning, start, progress, cancel,
           guidance_plan: StepGuidance, runner, batched: bool, on_step=None) -> torch.Tensor:
    steps = len(sampler.timesteps)
    begin = time.perf_counter()
    # first step of the low-noise expert (two-expert models), for per-expert LoRA schedules
    switch = next((i for i, t in enumerate(sampler.timesteps) if plan.at(float(t))[0] == "low_noise"), None)
    for i in range(start, steps):
        if cancel is not None and cancel.cancelled:
            raise Cancelled(f"cancelled before step {i + 1} of {steps}")
        t = sampler.timesteps[i]
        expert, guidance = plan.at(float(t))
        dit = networks[expert]
        timestep = conditioning.token_timesteps(t.to(latent.device), dit.config.patch_size)
        passes = guidance_plan.passes(i, guidance)
        if on_step is not None:
            on_step(i, steps, expert, switch)
        with torch.inference_mode():
            if batched and passes == ("cond", "uncond"):
                if runner is not None:
                    runner.begin(i, f"{expert}/cond+uncond")
                flows = _batched_passes(dit, latent, timestep, cond, uncond)
            else:
                flows = {}
                for name in passes:
                    if runner is not None:
                        runner.begin(i, f"{expert}/{name}", guidance_plan.skip_layers(name))
                    kwargs = cond if name.startswith("cond") else uncond
                    flows[name] = dit(latent[None], timestep, **kwargs)[0]
            flow = guidance_plan.combine(i, flows, guidance, latent)
            latent = sampler.step(flow, i, latent)
            if conditioning.fixed_mask is not None:
                latent = (1 - conditioning.fixed_mask) * conditioning.fixed_latent + conditioning.fixed_mask * latent
        if progress is not None:
            done = i + 1 - start
            elapsed = time.perf_counter() - begin
            progress(StepInfo(step=i + 1, total=steps, timestep=float(t), expert=expert, guidance=guidance,
                              elapsed=elapsed, eta=elapsed / done * (steps - i - 1), latent=latent,
                              passes=passes))
    return latent


def _batched_passes(dit, latent, timestep, cond: dict, uncond: dict) -> dict[str, torch.Tensor]:
    """The prompt and negative-prompt passes as one batch of two (text padded with zero rows, which
    the DiT's padding fold makes exact)."""
    ctx_c, ctx_u = cond["context"], uncond["context"]
    n = max(ctx_c.shape[1], ctx_u.shape[1])
    kwargs = {"context": torch.cat([F.pad(c, (0, 0, 0, n - c.shape[1])) for c in (ctx_c, ctx_u)])}
    for key, value in cond.items():
        if key != "context":
            kwargs[key] = torch.cat([value, uncond[key]]) if torch.is_tensor(value) else value
    out = dit(torch.cat([latent[None]] * 2), torch.cat([timestep] * 2), **kwargs)
    return {"cond": out[0], "uncond": out[1]}
