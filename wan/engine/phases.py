"""Guidance phases: which guidance scale, which expert and which LoRA strengths run at each step.

A run has one to three phases (Wan2GP's ``guidance_phases``). Timesteps go from 1000 down to 0;
phase 2 starts at the first step whose timestep is below ``switch_threshold``, phase 3 at the first
one below ``switch_threshold2``. This is the official Wan rule for the expert switch of Wan 2.2
A14B (the high-noise expert runs while ``t >= boundary * 1000``), so a two-phase A14B run is the
run of before phases existed, step for step. (Wan2GP changes phase when ``t <= threshold``; the two
differ only on a step whose timestep equals a threshold exactly.)

Each phase has its own guidance: phase 1 the guidance of its expert (``guidance``, or
``guidance_high_noise`` for the high-noise expert), phases 2 and 3 ``guidance2_scale`` and
``guidance3_scale``, which default to the guidance of the expert that runs them.

On Wan 2.2 A14B one phase boundary is the expert switch: the end of phase ``model_switch_phase``
(1 by default; with three phases, 2 gives Wan2GP's "Lightning 3 phases": a guided phase and an
accelerated phase on the high-noise expert, then the low-noise expert). Its threshold is the
model's ``boundary`` (x1000); a request may give it as ``switch_threshold`` (or
``switch_threshold2``) instead, Wan2GP's way, and the two must then agree.

This module is plain data and arithmetic (no torch): the request checks use it before any model
loads, and the denoising loop reads the plan through :meth:`PhasePlan.at` and :meth:`PhasePlan.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from wan.lora.schedule import PhaseLayout

EXPERT_WORDS = {"transformer": "", "high_noise": "high-noise expert", "low_noise": "low-noise expert"}
THRESHOLD_FIELDS = ("switch_threshold", "switch_threshold2")


@dataclass(frozen=True)
class PhasePlan:
    """The phases of one run.

    Attributes:
        experts: the network of each phase ("transformer", or "high_noise" / "low_noise").
        guidance: the guidance scale of each phase.
        thresholds: one fewer than the phases, descending, on the 0..1000 timestep scale: phase
            ``k + 1`` starts at the first step whose timestep is below ``thresholds[k]``.
    """

    experts: tuple[str, ...]
    guidance: tuple[float, ...]
    thresholds: tuple[float, ...] = ()

    def __post_init__(self):
        if not 1 <= len(self.experts) <= 3 or len(self.guidance) != len(self.experts) \
                or len(self.thresholds) != len(self.experts) - 1:
            raise ValueError(f"a phase plan has 1 to 3 phases, each with an expert and a guidance, and one threshold "
                             f"between two phases; got {self}")

    def phase_at(self, t: float) -> int:
        """0-based phase of integer or float timestep ``t``."""
        return sum(1 for threshold in self.thresholds if t < threshold)

    def at(self, t: float) -> tuple[str, float]:
        """(expert name, guidance) at timestep ``t``."""
        k = self.phase_at(t)
        return self.experts[k], self.guidance[k]

    def layout(self, timesteps: Sequence[float]) -> PhaseLayout:
        """Where each phase starts among the run's ``timesteps`` (all of them, from step 0)."""
        phases = [self.phase_at(float(t)) for t in timesteps]
        starts = tuple(next((i for i, p in enumerate(phases) if p >= k), len(phases))
                       for k in range(len(self.experts)))
        return PhaseLayout(steps=len(phases), starts=starts, experts=self.experts)

    def describe(self, timesteps: Sequence[float], start: int = 0) -> str:
        """The phases in words, e.g. "phase 1: steps 1-2, high-noise expert, guidance 3.5; ..."
        (steps before ``start``, which a video-to-video run skips, are left out)."""
        layout = self.layout(timesteps)
        parts = []
        for k, expert in enumerate(self.experts):
            first, count = layout.span(k)
            first, count = max(first, start), count - max(0, start - first)
            steps = "no step" if count <= 0 else (f"step {first + 1}" if count == 1
                                                 else f"steps {first + 1}-{first + count}")
            who = EXPERT_WORDS[expert]
            parts.append(f"phase {k + 1}: {steps}{', ' + who if who else ''}, guidance {self.guidance[k]:g}")
        return "; ".join(parts)

    @classmethod
    def of_request(cls, req, two_expert: bool) -> "PhasePlan":
        """The plan of a resolved request (``resolve_request``'s output) for a model of one or
        two experts."""
        n = req.guidance_phases or (2 if two_expert else 1)
        thresholds = [req.switch_threshold, req.switch_threshold2][:n - 1]
        if two_expert:
            m = req.model_switch_phase or 1
            if thresholds[m - 1] is None:
                thresholds[m - 1] = req.boundary * 1000  # the reference's rule: high noise while t >= boundary*1000
            experts = tuple("high_noise" if k < m else "low_noise" for k in range(n))
        else:
            experts = ("transformer",) * n
        own = {"high_noise": req.guidance_high_noise, "low_noise": req.guidance, "transformer": req.guidance}
        given = (None, req.guidance2_scale, req.guidance3_scale)
        guidance = tuple(float(given[k] if given[k] is not None else own[e]) for k, e in enumerate(experts))
        return cls(experts, guidance, tuple(float(t) for t in thresholds))


def nag_scales(req) -> tuple[float, float, float]:
    """NAG's scale in phases 1, 2 and 3: ``nag_scale``, then ``nag2_scale`` / ``nag3_scale`` where given."""
    first = float(req.nag_scale)
    return (first, *(first if v is None else float(v) for v in (req.nag2_scale, req.nag3_scale)))


def expert_plan(boundary: float | None, guidance: float, guidance_high_noise: float | None = None) -> PhasePlan:
    """The plan of a run without guidance phases: one network, or the two experts of Wan 2.2 A14B
    switching at ``boundary * 1000`` with their own guidance."""
    if boundary is None:
        return PhasePlan(("transformer",), (float(guidance),))
    return PhasePlan(("high_noise", "low_noise"), (float(guidance_high_noise), float(guidance)),
                     (boundary * 1000,))


def phase_guidances(req, two_expert: bool) -> tuple[float, ...]:
    """The guidance scales a resolved request runs with, one per phase."""
    return PhasePlan.of_request(req, two_expert).guidance


# ---------------------------------------------------------------------------------------------
# Resolution (called by ``resolve_request``; errors name the field)


def _error(name: str, value: Any, allowed: str):
    from wan.engine.request import RequestError
    return RequestError(name, value, allowed)


def resolve_phases(req, spec, boundary: float | None) -> dict[str, Any]:
    """The phase fields of the resolved request, checked: ``guidance_phases``,
    ``model_switch_phase`` and, on two-expert models, ``boundary`` (``boundary`` is the one
    resolved so far: the request's or the model's).

    Raises:
        RequestError: naming the first field whose value is not allowed.
    """
    two = spec.is_two_expert
    n = req.guidance_phases if req.guidance_phases is not None else (2 if two else 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 3:
        raise _error("guidance_phases", n, "1, 2 or 3 guidance phases")
    if two and n == 1:
        raise _error("guidance_phases", n, f"2 or 3 for a two-expert model ({spec.id}): the switch to the "
                                           "low-noise expert is the end of a phase")
    for name, need in (("guidance2_scale", 2), ("switch_threshold", 2), ("nag2_scale", 2), ("guidance3_scale", 3),
                       ("switch_threshold2", 3), ("nag3_scale", 3)):
        value = getattr(req, name)
        if value is not None and n < need:
            more = "2 or 3" if need == 2 else "3"
            raise _error(name, value, f"only with --guidance_phases {more} (this run has {n} phase"
                                      f"{'s' if n > 1 else ''})")
    m = req.model_switch_phase
    if not two and m is not None:
        raise _error("model_switch_phase", m, f"only for two-expert models (Wan 2.2 A14B); {spec.id} has one network")
    if two:
        m = 1 if m is None else m
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n - 1:
            raise _error("model_switch_phase", m, "1: the low-noise expert takes over after phase 1" if n == 2 else
                         "1 or 2: the phase after which the low-noise expert takes over")
    for name in THRESHOLD_FIELDS:
        value = getattr(req, name)
        if value is not None and not 0 <= value <= 1000:
            raise _error(name, value, "a timestep from 0 to 1000 (the next phase starts at the first step whose "
                                      "timestep is below it)")
    thresholds = {name: getattr(req, name) for name in THRESHOLD_FIELDS}
    out: dict[str, Any] = {"guidance_phases": n, "model_switch_phase": m if two else None}
    if two:
        key = THRESHOLD_FIELDS[m - 1]
        given = thresholds[key]
        if given is not None:
            if req.boundary is not None and abs(req.boundary * 1000 - given) > 1e-6:
                raise _error(key, given, f"the expert switch, which --boundary {req.boundary:g} puts at "
                                         f"{req.boundary * 1000:g}: give one of them, or the same switch")
            boundary = given / 1000
        thresholds[key] = given if given is not None else boundary * 1000
        out["boundary"] = boundary
    for k, name in enumerate(THRESHOLD_FIELDS[:n - 1]):
        if thresholds[name] is None:
            raise _error(name, None, f"a timestep from 0 to 1000 where phase {k + 2} starts (needed with "
                                     f"--guidance_phases {n})")
    if n == 3 and thresholds["switch_threshold2"] > thresholds["switch_threshold"]:
        raise _error("switch_threshold2", thresholds["switch_threshold2"],
                     f"at most switch_threshold ({thresholds['switch_threshold']:g}): timesteps go from 1000 "
                     "down to 0, so phase 3 comes after phase 2")
    return out


def resolve_timesteps(req, sampler: str) -> tuple[int | None, list[float]]:
    """(steps, timesteps) of a request giving its own denoising timesteps (``timesteps``) to the
    resolved ``sampler``; (None, []) when it gives none (the sampler's grid from steps and shift)."""
    from wan.engine.samplers import EXPLICIT_TIMESTEP_SAMPLERS
    ts = list(req.timesteps or [])
    if not ts:
        return None, []
    if sampler not in EXPLICIT_TIMESTEP_SAMPLERS:
        raise _error("timesteps", ts, f"only with --sampler {' or '.join(EXPLICIT_TIMESTEP_SAMPLERS)} (first-order "
                                      f"samplers that step between any noise levels); {sampler} keeps its grid")
    if any(not 0 < t <= 1000 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise _error("timesteps", ts, "timesteps in (0, 1000], strictly decreasing, one per step, e.g. 1000 757 522")
    if req.steps is not None and req.steps != len(ts):
        raise _error("steps", req.steps, f"{len(ts)}, the number of --timesteps given (or leave steps out)")
    return len(ts), [float(t) for t in ts]


def check_phase_steps(req, spec) -> None:
    """The run's phases can apply: each LoRA multiplier with ';' fits them, and a three-phase run
    gives every phase at least one of the steps it runs (with few steps or thresholds close
    together a phase can fall between two timesteps: refused, naming them)."""
    from wan.lora.schedule import parse_multiplier
    for lora in req.loras:
        try:
            parse_multiplier(lora.multiplier).check_phases(req.guidance_phases, spec.is_two_expert)
        except ValueError as e:
            raise _error("loras", f"{lora.path}:{lora.multiplier}", str(e)) from None
    if req.guidance_phases != 3:
        return
    from wan.engine.samplers import make_sampler
    sampler = make_sampler(req.sampler, req.steps, req.shift, timesteps=req.timesteps or None)
    start = sampler.start_index(req.strength) if req.task == "v2v" else 0
    plan = PhasePlan.of_request(req, spec.is_two_expert)
    timesteps = [float(t) for t in sampler.timesteps]
    layout = plan.layout(timesteps)
    for k in range(3):
        first, count = layout.span(k)
        if first + count <= start or count <= 0:
            shown = ", ".join(f"{t:g}" for t in timesteps[start:])
            index = 0 if k == 0 else 1  # phase 1 empty: threshold 1 too high; else threshold 2 too close or low
            field = THRESHOLD_FIELDS[index]
            raise _error(field, getattr(req, field) if getattr(req, field) is not None else plan.thresholds[index],
                         f"thresholds that give each of the 3 phases a step; phase {k + 1} gets none of this run's "
                         f"timesteps ({shown}: {req.sampler}, {req.steps} steps, shift {req.shift:g}); "
                         f"the phases are {plan.describe(timesteps, start)}")
