"""LoRA strength: constant, per-step schedules, per-expert and per-phase values, and module-name filters.

Multiplier syntax (one string per LoRA, whitespace around numbers is ignored):

* ``"0.8"``: the same strength at every step.
* ``"1.0,0.8,0.6"``: a per-step schedule. N values are spread over the S steps they cover: step
  ``i`` uses value ``floor(i * N / S)``. With 6 steps, ``1.0,0.8,0.6`` gives 1.0 1.0 0.8 0.8 0.6
  0.6. (Wan2GP semantics; we use exact integer arithmetic where Wan2GP adds floats.)
* ``"1;0"``: per expert for Wan 2.2 A14B, high-noise value first, low-noise value second. Each side
  may be a schedule: ``"1,0.5;0"``. As in Wan2GP, each expert's schedule is spread over the steps
  that expert runs, so ``at`` needs ``switch_step`` (the first step of the low-noise expert) as soon
  as a per-expert side has more than one value.
* ``"0;1;0"``: per guidance phase (Wan2GP's phases, ``--guidance_phases 2|3``): one value (or
  schedule) per phase, each spread over the steps of its phase. With 2 phases on A14B the phases
  are the experts, so ``"1;0"`` means the same either way. Per-phase values are read with
  :meth:`Multiplier.at_step` and a :class:`PhaseLayout` (which phase and expert run each step).

Decisions:

* A string with ``;`` must match the run: ``check_phases`` accepts one side; as many sides as
  guidance phases; or, on a two-expert model, two sides, which stay per expert ("high;low") when
  the run has 3 phases (Wan2GP pads such a string to 3 phases, which gives the same values for
  constant sides; a schedule side here is spread over all the steps of its expert). Anything else
  is an error, never a silent first value: a preset written for another model or another phase
  count must not run quietly wrong.
* A plain string (no ``;``) on A14B applies to both experts and is spread over all the steps.
* At most three sides (Wan2GP's three phases).
* Values may be negative (slider LoRAs); they must be finite.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

EXPERTS = ("transformer", "high_noise", "low_noise")
SYNTAX = ("a number ('0.8'), a per-step schedule of numbers separated by ',' ('1.0,0.8,0.6'), "
          "per expert 'high;low' for Wan 2.2 A14B where each side is a number or a schedule ('1,0.5;0'), or "
          "per guidance phase 'p1;p2;p3' ('0;1;0')")
MAX_PHASES = 3
# A plain decimal number: float() alone would also accept 'nan', 'inf' and '1_0'.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _spread(values: tuple[float, ...], index: int, count: int) -> float:
    """The value of a schedule of ``len(values)`` entries at position ``index`` of ``count`` steps."""
    return values[index * len(values) // count]


@dataclass(frozen=True)
class PhaseLayout:
    """Which guidance phase and which expert run each step of one run (plain data, built by the
    engine from its phase plan and the sampler's timesteps).

    Attributes:
        steps: steps of the whole run (a video-to-video run that starts late counts them all).
        starts: first step of each phase, ascending, ``starts[0] == 0``; a phase whose start equals
            the next one's runs no step.
        experts: the expert of each phase ("transformer", or "high_noise" / "low_noise").
    """

    steps: int
    starts: tuple[int, ...]
    experts: tuple[str, ...]

    def phase(self, step: int) -> int:
        """0-based phase of ``step``."""
        return max(k for k, s in enumerate(self.starts) if s <= step)

    def span(self, phase: int) -> tuple[int, int]:
        """(first step, number of steps) of ``phase``."""
        end = self.starts[phase + 1] if phase + 1 < len(self.starts) else self.steps
        return self.starts[phase], end - self.starts[phase]

    def expert_span(self, expert: str) -> tuple[int, int]:
        """(first step, number of steps) run by ``expert`` (its phases are consecutive)."""
        ks = [k for k, e in enumerate(self.experts) if e == expert]
        first, _ = self.span(ks[0])
        last, count = self.span(ks[-1])
        return first, last + count - first

    @property
    def two_expert(self) -> bool:
        return "high_noise" in self.experts or "low_noise" in self.experts


@dataclass(frozen=True)
class Multiplier:
    """A parsed LoRA strength.

    Attributes:
        text: the string it was parsed from (kept for presets and messages).
        phases: one schedule shared by every step, or one per side of ';' (two: high-noise and
            low-noise expert, or guidance phases; three: guidance phases).
    """

    text: str
    phases: tuple[tuple[float, ...], ...]

    @property
    def per_expert(self) -> bool:
        return len(self.phases) == 2

    @property
    def is_constant(self) -> bool:
        """True when every step and expert gets the same value (callers may then skip updates)."""
        return len({v for phase in self.phases for v in phase}) == 1

    def at(self, step: int, steps: int, expert: str = "transformer", switch_step: int | None = None) -> float:
        """The strength at ``step`` (0-based) of a run of ``steps`` steps, for ``expert``.

        ``switch_step`` is the first step run by the low-noise expert on Wan 2.2 A14B (steps
        ``0..switch_step-1`` run the high-noise expert); it is needed when a per-expert side is a
        schedule, and checked against ``expert`` whenever it is given.
        """
        self._check_position(step, steps, expert, switch_step)
        if len(self.phases) == 1:
            return _spread(self.phases[0], step, steps)
        if len(self.phases) > 2:
            raise ValueError(
                f"LoRA multiplier {self.text!r} gives {len(self.phases)} per-phase values: they need the run's "
                f"guidance phases (--guidance_phases {len(self.phases)}), read with at_step")
        if expert == "transformer":
            raise ValueError(
                f"LoRA multiplier {self.text!r} gives per-expert values (high;low) but the model has a single "
                f"transformer; use one value or one schedule, e.g. {self.text.split(';')[0].strip()!r}")
        values = self.phases[0] if expert == "high_noise" else self.phases[1]
        if len(values) == 1:
            return values[0]
        if switch_step is None:
            raise ValueError(
                f"LoRA multiplier {self.text!r}: the {expert} schedule is spread over the steps that expert runs, "
                f"so switch_step (first low-noise step) must be given")
        if expert == "high_noise":
            return _spread(values, step, switch_step)
        return _spread(values, step - switch_step, steps - switch_step)

    def per_step(self, steps: int, switch_step: int | None = None) -> list[float]:
        """The strength at each step of a run: single-expert when ``switch_step`` is None, else A14B
        with the high-noise expert before ``switch_step`` and the low-noise one from it on."""
        def expert(i: int) -> str:
            if switch_step is None:
                return "transformer"
            return "high_noise" if i < switch_step else "low_noise"
        return [self.at(i, steps, expert(i), switch_step) for i in range(steps)]

    def check_phases(self, phases: int, two_expert: bool) -> None:
        """Raises ValueError unless the string fits a run of ``phases`` guidance phases (1 to 3) on
        a model of one or two experts (see the module docstring)."""
        sides = len(self.phases)
        if sides == 1 or sides == phases or (sides == 2 and two_expert):
            return
        if sides == 2:
            raise ValueError(
                f"LoRA multiplier {self.text!r} gives two values separated by ';' (per expert high;low, or per "
                f"guidance phase) but the model has a single transformer and the run has {phases} guidance "
                f"phase{'s' if phases > 1 else ''}; use one value or schedule, e.g. "
                f"{self.text.split(';')[0].strip()!r}, or --guidance_phases 2")
        raise ValueError(
            f"LoRA multiplier {self.text!r} gives {sides} per-phase values but the run has {phases} guidance "
            f"phase{'s' if phases > 1 else ''}; give one value per phase (--guidance_phases {sides}) or one value")

    def at_step(self, step: int, layout: PhaseLayout) -> float:
        """The strength at ``step`` (0-based) of a run whose phases and experts ``layout`` gives.

        One side: spread over every step. One side per phase: each spread over its phase's steps.
        Two sides on a two-expert run of three phases: per expert, each spread over its expert's
        steps."""
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < layout.steps:
            raise ValueError(f"LoRA multiplier {self.text!r}: step must be in 0..{layout.steps - 1}, got {step!r}")
        self.check_phases(len(layout.starts), layout.two_expert)
        if len(self.phases) == 1:
            return _spread(self.phases[0], step, layout.steps)
        phase = layout.phase(step)
        if len(self.phases) == len(layout.starts):
            values, (first, count) = self.phases[phase], layout.span(phase)
        else:  # "high;low" on a run of three phases
            expert = layout.experts[phase]
            values = self.phases[0] if expert == "high_noise" else self.phases[1]
            first, count = layout.expert_span(expert)
        return _spread(values, step - first, count)

    def per_step_in(self, layout: PhaseLayout) -> list[float]:
        """The strength at each step of a run with phases ``layout``."""
        return [self.at_step(i, layout) for i in range(layout.steps)]

    def _check_position(self, step: int, steps: int, expert: str, switch_step: int | None) -> None:
        if expert not in EXPERTS:
            raise ValueError(f"LoRA multiplier {self.text!r}: expert {expert!r} is not one of {EXPERTS}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"LoRA multiplier {self.text!r}: steps must be a positive integer, got {steps!r}")
        if not isinstance(step, int) or not 0 <= step < steps:
            raise ValueError(f"LoRA multiplier {self.text!r}: step must be in 0..{steps - 1}, got {step!r}")
        if switch_step is None:
            return
        if not isinstance(switch_step, int) or not 0 <= switch_step <= steps:
            raise ValueError(
                f"LoRA multiplier {self.text!r}: switch_step must be in 0..{steps}, got {switch_step!r}")
        if expert == "high_noise" and step >= switch_step:
            raise ValueError(
                f"LoRA multiplier {self.text!r}: the high-noise expert runs steps 0..{switch_step - 1}, "
                f"not step {step}")
        if expert == "low_noise" and step < switch_step:
            raise ValueError(
                f"LoRA multiplier {self.text!r}: the low-noise expert runs steps {switch_step}..{steps - 1}, "
                f"not step {step}")

    def __str__(self) -> str:
        return self.text


def parse_multiplier(text: str | float) -> Multiplier:
    """Parses a multiplier string (see the module docstring); numbers are accepted as is.

    Raises ValueError naming the text, the bad part and the accepted syntax.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"LoRA multiplier {text!r}: expected a string or a number, i.e. {SYNTAX}")  # noqa: TRY004 - ValueError for all bad input
    raw = str(text)
    stripped = raw.strip()
    if not stripped:
        raise ValueError(f"LoRA multiplier {raw!r} is empty; expected {SYNTAX}")
    sides = stripped.split(";")
    if len(sides) > MAX_PHASES:
        raise ValueError(
            f"LoRA multiplier {raw!r}: {len(sides)} parts separated by ';', at most {MAX_PHASES} (per expert "
            f"high;low, or one per guidance phase) are allowed; expected {SYNTAX}")
    phases = tuple(_parse_schedule(raw, side) for side in sides)
    return Multiplier(text=stripped, phases=phases)


def _parse_schedule(raw: str, side: str) -> tuple[float, ...]:
    """Parses one comma-separated schedule of ``raw`` (one side of a ';')."""
    values = []
    for part in side.split(","):
        token = part.strip()
        if not _NUMBER.fullmatch(token):
            what = "an empty value" if not token else f"{token!r} is not a finite decimal number"
            raise ValueError(f"LoRA multiplier {raw!r}: {what} (in {side.strip()!r}); expected {SYNTAX}")
        values.append(float(token))
    return tuple(values)


def include_exclude(patterns_in: list[str] | None,
                    patterns_out: list[str] | None) -> Callable[[str], bool]:
    """A predicate on official module names (e.g. ``blocks.0.self_attn.q``) saying whether a LoRA
    applies there.

    Semantics of musubi-tuner's inference-time ``--include_patterns`` / ``--exclude_patterns``:
    include first (when given and non-empty, a name must match at least one pattern), then exclude (a name matching
    any pattern is dropped). Patterns use ``re.search``, so anchor them (``^``/``$``) to match whole
    names. An invalid pattern is a ValueError naming it.
    """
    includes = _compile_patterns(patterns_in, "include")
    excludes = _compile_patterns(patterns_out, "exclude")

    def applies(name: str) -> bool:
        if includes is not None and not any(p.search(name) for p in includes):
            return False
        return not any(p.search(name) for p in excludes or ())

    return applies


def _compile_patterns(patterns: list[str] | None, kind: str) -> list[re.Pattern] | None:
    if not patterns:
        return None  # an empty list (a CLI default) means no filter, not "match nothing"
    if isinstance(patterns, str):
        # A lone string would be iterated character by character: a classic silent mistake.
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as exc:
            raise ValueError(f"LoRA {kind} pattern {pattern!r} is not a valid regular expression: {exc}") from None
    return compiled
