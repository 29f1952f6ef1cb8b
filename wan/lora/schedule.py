"""LoRA strength: constant, per-step schedules, per-expert values, and module-name filters.

Multiplier syntax (one string per LoRA, whitespace around numbers is ignored):

* ``"0.8"``: the same strength at every step.
* ``"1.0,0.8,0.6"``: a per-step schedule. N values are spread over the S steps they cover: step
  ``i`` uses value ``floor(i * N / S)``. With 6 steps, ``1.0,0.8,0.6`` gives 1.0 1.0 0.8 0.8 0.6
  0.6. (Wan2GP semantics; we use exact integer arithmetic where Wan2GP adds floats.)
* ``"1;0"``: per expert for Wan 2.2 A14B, high-noise value first, low-noise value second. Each side
  may be a schedule: ``"1,0.5;0"``. As in Wan2GP, each expert's schedule is spread over the steps
  that expert runs, so ``at`` needs ``switch_step`` (the first step of the low-noise expert) as soon
  as a per-expert side has more than one value.

Decisions:

* A per-expert string (with ``;``) asked for on a single-expert model (``expert="transformer"``)
  is an error: silently taking the first value would hide a preset written for another model.
* A plain string (no ``;``) on A14B applies to both experts and is spread over all the steps.
* Exactly two sides are accepted (Wan2GP's third "phase" is a CFG phase of the same low-noise model,
  which this project does not have).
* Values may be negative (slider LoRAs); they must be finite.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

EXPERTS = ("transformer", "high_noise", "low_noise")
SYNTAX = ("a number ('0.8'), a per-step schedule of numbers separated by ',' ('1.0,0.8,0.6'), or "
          "per expert 'high;low' for Wan 2.2 A14B where each side is a number or a schedule ('1,0.5;0')")
# A plain decimal number: float() alone would also accept 'nan', 'inf' and '1_0'.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _spread(values: tuple[float, ...], index: int, count: int) -> float:
    """The value of a schedule of ``len(values)`` entries at position ``index`` of ``count`` steps."""
    return values[index * len(values) // count]


@dataclass(frozen=True)
class Multiplier:
    """A parsed LoRA strength.

    Attributes:
        text: the string it was parsed from (kept for presets and messages).
        phases: one schedule shared by every expert, or two: (high-noise, low-noise).
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
        if not self.per_expert:
            return _spread(self.phases[0], step, steps)
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
    if len(sides) > 2:
        raise ValueError(
            f"LoRA multiplier {raw!r}: {len(sides)} per-expert parts separated by ';', at most 2 (high;low) "
            f"are allowed; expected {SYNTAX}")
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
