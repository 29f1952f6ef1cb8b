"""The denoising loop: classifier-free guidance, guidance phases, Wan 2.2 expert switching,
progress and cancel.

The loop follows the official scripts step for step: at integer timestep ``t`` the model (for
Wan 2.2 A14B: the high-noise expert when ``t >= boundary * 1000``, else the low-noise expert,
each with its own guidance) predicts the flow for the prompt and for the negative prompt,
``flow = uncond + g * (cond - uncond)``, and the sampler moves the latent to the next step. With
guidance phases (:mod:`wan.engine.phases`) the guidance and the expert of each step come from the
phase the step's timestep falls in; a step at guidance 1 runs the prompt pass alone.
Cancel is checked between steps, so a cancel takes effect within one step.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from wan.engine.phases import PhasePlan
from wan.optim.guidance import StepGuidance



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
    phase: int = 1                      # guidance phase of the step, 1-based (1 when the run has one)
    window: int = 1                     # sliding windows: the window this step belongs to (1-based)
    windows: int = 1                    # ... of how many (1: a plain run)


class CancelToken:
    """Set from any thread to stop a generation at the next step boundary."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class Denoising:
    """What one run of the loop needs, built by the engine (``Engine.denoise``).

    Attributes:
        networks: expert name -> DiT ("transformer", or "high_noise" and "low_noise"), already
            attached to the job (``wan.engine.attach``): attention, RIFLEx, block runner, LoRAs.
        sampler: from ``wan.engine.samplers.make_sampler``.
        cond, uncond: DiT keyword arguments of the two passes (``context`` and the task inputs).
        plan: which expert and guidance run at each timestep (:class:`~wan.engine.phases.PhasePlan`).
        conditioning: the task's :class:`~wan.engine.conditioning.Conditioning` (per-token
            timesteps and first-frame replacement of TI2V).
        guidance: the step's passes and how they combine (CFG skip, SLG, CFG-Zero*).
        start: first step (video-to-video starts part-way).
        runner: the block runner set on the networks, told which step and pass runs (or None).
        batched_cfg: run the prompt and negative-prompt passes as one batch of two.
        on_step: called before each step with (step, steps, expert, first low-noise step, phase
            layout: a :class:`~wan.lora.schedule.PhaseLayout`), e.g. to move LoRA multipliers.
        cfg_parallel: a step's passes split over processes (``wan.parallel.CfgParallel``: anything
            with ``run_passes(passes, compute) -> {pass: flow}``); None runs them all here.
        nag: normalized attention guidance attached to the networks (``wan.optim.nag.NagGuidance``),
            told the step and pass before each model pass as the runner is (its scale is read per
            step there); None: off. It needs the passes run one by one (not ``batched_cfg``).
    """

    networks: Mapping[str, Callable]
    sampler: Any
    cond: dict
    uncond: dict
    plan: PhasePlan
    conditioning: Any
    guidance: StepGuidance
    start: int = 0
    runner: Any = None
    batched_cfg: bool = False
    on_step: Callable[..., None] | None = None
    cfg_parallel: Any = None
    nag: Any = None


def denoise(run: Denoising, latent: torch.Tensor, *, progress: Callable[[StepInfo], None] | None = None,
            cancel: CancelToken | None = None) -> torch.Tensor:
    """Runs the sampler's steps from ``run.start`` on ``latent`` [C, F, H, W] (noise, or the noised
    input for video-to-video) and returns the final latent."""
    sampler, plan, conditioning, guidance_plan = run.sampler, run.plan, run.conditioning, run.guidance

    def tell(i: int, pass_name: str, skip: frozenset[int] = frozenset()) -> None:
        """Tells the block runner and NAG which step and pass run next."""
        if run.runner is not None:
            run.runner.begin(i, pass_name, skip)
        if run.nag is not None:
            run.nag.begin(i, pass_name)

    steps = len(sampler.timesteps)
    begin = time.perf_counter()
    # first step of the low-noise expert (two-expert models), for per-expert LoRA schedules
    switch = next((i for i, t in enumerate(sampler.timesteps) if plan.at(float(t))[0] == "low_noise"), None)
    layout = plan.layout([float(t) for t in sampler.timesteps])  # the phases, for per-phase LoRA strengths
    keep = getattr(conditioning, "keep", None)  # a sliding window's overlap latents, at each step's noise level
    overlap_noise = getattr(conditioning, "overlap_noise", None)
    if keep is not None:
        latent = keep.apply(latent, float(sampler.sigmas[run.start]))
    for i in range(run.start, steps):
        if cancel is not None and cancel.cancelled:
            raise Cancelled(f"cancelled before step {i + 1} of {steps}")
        t = sampler.timesteps[i]
        expert, guidance = plan.at(float(t))
        phase = plan.phase_at(float(t)) + 1
        dit = run.networks[expert]
        timestep = conditioning.token_timesteps(t.to(latent.device), dit.config.patch_size)
        passes = guidance_plan.passes(i, guidance)
        if run.on_step is not None:
            run.on_step(i, steps, expert, switch, layout)
        with torch.inference_mode():
            if overlap_noise is not None:  # a VACE window's overlap: its control latents noised afresh
                overlap_noise.apply()
            if run.cfg_parallel is not None and len(passes) > 1:
                def compute(name, i=i, expert=expert, dit=dit, latent=latent, timestep=timestep):  # one pass here
                    tell(i, f"{expert}/{name}", guidance_plan.skip_layers(name))
                    return dit(latent[None], timestep, **(run.cond if name.startswith("cond") else run.uncond))[0]
                flows = run.cfg_parallel.run_passes(passes, compute)
            elif run.batched_cfg and passes == ("cond", "uncond") and run.nag is None:
                tell(i, f"{expert}/cond+uncond")
                flows = _batched_passes(dit, latent, timestep, run.cond, run.uncond)
            else:
                flows = {}
                for name in passes:
                    tell(i, f"{expert}/{name}", guidance_plan.skip_layers(name))
                    kwargs = run.cond if name.startswith("cond") else run.uncond
                    flows[name] = dit(latent[None], timestep, **kwargs)[0]
            flow = guidance_plan.combine(i, flows, guidance, latent)
            latent = sampler.step(flow, i, latent)
            if conditioning.fixed_mask is not None:
                latent = (1 - conditioning.fixed_mask) * conditioning.fixed_latent + conditioning.fixed_mask * latent
            if keep is not None:
                latent = keep.apply(latent, float(sampler.sigmas[i + 1]))
        if progress is not None:
            done = i + 1 - run.start
            elapsed = time.perf_counter() - begin
            progress(StepInfo(step=i + 1, total=steps, timestep=float(t), expert=expert, guidance=guidance,
                              elapsed=elapsed, eta=elapsed / done * (steps - i - 1), latent=latent,
                              passes=passes, phase=phase))
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
