"""Applying LoRAs to a loaded DiT at run time, without reloading it.

Two modes (see :mod:`wan.lora.merge` for the choice and its costs):

* ``hooks`` (default; ``auto`` means the same): each targeted linear layer gets a forward hook
  that adds, for every LoRA on it, the LoRA's output times the multiplier in effect: the low-rank
  path ``scale * up(down(x))`` for plain LoRAs (cheap, and it works on fp8/int8 quantised bases),
  ``x @ delta^T`` for LyCORIS and full deltas, plus the bias delta. DoRA rescales the merged weight
  per output row, so a layer with a DoRA LoRA computes its output from the merged weight instead.
  Detaching removes the hooks: the base outputs come back exactly, the base weights were never
  changed.
* ``merge``: the deltas are written into the weights (originals kept aside on the CPU and copied
  back at detach, so the base is bit-identical afterwards); layers that cannot be merged without
  losing precision (quantised, non-float, streamed) keep hooks.

Targets that are not linear layers (norms, convs, bare parameters) are merged in both modes.

The multiplier of each LoRA can change per step and per expert (``set_step``), as the strength
schedules of ``wan.lora.schedule`` describe; merged layers are re-merged only when their value
changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from wan.lora.merge import Term, WeightMerge, merged_bias, merged_weight, place_targets, placement_notices, resolve_mode


@dataclass
class LoraUse:
    """One LoRA as a job uses it: its weights (``wan.lora.formats.LoraFile``), the multiplier
    (anything with ``at(step, steps, expert) -> float``), and which modules it may touch."""

    lora: object
    multiplier: object
    allow: Callable[[str], bool] = lambda name: True


@dataclass
class LoraRuntime:
    """The LoRAs attached to one DiT for one job (``attach`` / ``detach``).

    ``mode``: ``hooks`` | ``merge`` | ``auto`` (= hooks). After ``attach``, ``attached`` maps each
    applied target to the number of LoRAs on it; ``hooked`` / ``merged`` say how it was applied.
    """

    uses: list[LoraUse]
    mode: str = "hooks"
    _multipliers: list[float] = field(default_factory=list)
    _hooks: list = field(default_factory=list)
    _merge: WeightMerge | None = None
    attached: dict[str, int] = field(default_factory=dict)  # module name -> number of LoRAs on it
    hooked: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)

    def __post_init__(self):
        resolve_mode(self.mode)  # a bad mode fails at construction, naming the allowed values

    def notices(self, dit) -> list[str]:
        """What attaching to ``dit`` will not do as asked (merge-mode layers that keep hooks,
        targets that cannot be applied), known before attaching."""
        return placement_notices(place_targets(dit, self.uses, self.mode), self.mode)

    def attach(self, dit) -> None:
        """Hooks or merges every target of ``dit`` that some LoRA has and may touch."""
        if self._hooks or self._merge is not None:
            raise RuntimeError("LoraRuntime.attach: already attached; detach first")
        placements = place_targets(dit, self.uses, self.mode)
        self._multipliers = [self._initial(u) for u in self.uses]
        try:
            for p in placements:
                if p.how == "hook":
                    for term in p.terms:
                        if term.weights.kind != "lora" or term.weights.diff is not None:
                            # LyCORIS kinds, full diffs, and a low-rank pair that also carries a .diff:
                            # one dense delta (the low-rank path alone would leave the .diff out)
                            term.dense = term.weights.delta(_weight_shape(p.module)).float()
                    self._hooks.append(p.module.register_forward_hook(self._hook(p.terms)))
                    self.hooked.append(p.name)
            self._merge = WeightMerge.of(placements)
            self.merged = self._merge.names
            self._merge.apply(self._multipliers)
        except Exception:
            self.detach()  # leave the model as it was: no hook, no merged weight
            raise
        self.attached = {p.name: len(p.terms) for p in placements if p.how != "skip"}

    def detach(self) -> None:
        """Removes the hooks and restores the merged weights bit for bit."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._merge is not None:
            self._merge.restore()
            self._merge = None
        self.attached.clear()
        self.hooked.clear()
        self.merged = []

    @property
    def merge_writes(self) -> int:
        """Weight writes made by the merge mode so far in this attachment (merges and restores)."""
        return self._merge.writes if self._merge is not None else 0

    def set_step(self, step: int, steps: int, expert: str = "transformer", switch_step: int | None = None,
                 layout=None) -> None:
        """Multipliers in effect from now on: each LoRA's value at (step, expert); ``switch_step``
        is the first low-noise step of a Wan 2.2 A14B run (per-expert schedules spread over it).
        ``layout`` (a :class:`wan.lora.schedule.PhaseLayout`), when given, places the step in the
        run's guidance phases, for per-phase values ("0;1;0"). Merged layers whose value changed
        are merged again from their kept originals."""
        if layout is not None:
            self._multipliers = [u.multiplier.at_step(step, layout) for u in self.uses]
        else:
            self._multipliers = [u.multiplier.at(step, steps, expert, switch_step) for u in self.uses]
        if self._merge is not None:
            self._merge.apply(self._multipliers)

    @staticmethod
    def _initial(use: LoraUse) -> float:
        """The multiplier before the first ``set_step`` (a forward outside a sampling loop): the
        value at step 0 for a plain model; 0 where that needs the experts' step positions."""
        try:
            return use.multiplier.at(0, 1, "transformer")
        except (ValueError, TypeError):
            return 0.0

    def multipliers(self) -> list[float]:
        return list(self._multipliers)

    def _hook(self, terms: list[Term]):
        dora = any(t.weights.dora_scale is not None for t in terms)

        def hook(mod, args, out):
            x = args[0]
            if dora:
                return self._dora_output(mod, x, terms, out)
            extra = None
            for t in terms:
                m = self._multipliers[t.use]
                if m == 0:
                    continue
                y = _term_output(t, x, m)
                extra = y if extra is None else extra.add_(y)
            return out if extra is None else out + extra.to(out.dtype)
        return hook

    def _dora_output(self, mod, x, terms, out):
        """DoRA: W' = magnitude * (W + dW) / ||W + dW|| (per output row), output from W'."""
        w = merged_weight(_dense_weight(mod), terms, self._multipliers).float()
        base_b = None if getattr(mod, "bias", None) is None else mod.bias.float()
        bias = merged_bias(base_b, terms, self._multipliers)
        return F.linear(x.float(), w, bias).to(out.dtype)


def _term_output(t: Term, x: torch.Tensor, m: float) -> torch.Tensor:
    """One LoRA's contribution to a layer's output at multiplier ``m`` (float32). The scalar goes on
    the narrow [..., rank] intermediate of a low-rank LoRA, not on the wide output."""
    w = t.weights
    down, up, dense, diff_b = _factors(t, x.device)
    xf = x.float()
    if dense is None:  # a plain low-rank pair
        y = F.linear(F.linear(xf, down).mul_(m * w.scale()), up)
    else:
        y = F.linear(xf, dense).mul_(m)
    if diff_b is not None:
        y.add_(diff_b, alpha=m)
    return y


def _factors(t: Term, device: torch.device) -> tuple:
    """(down, up, dense, diff_b) of a term in float32 on ``device`` (None where absent), converted
    once per device rather than at every forward (LoRA files are read on the CPU, often in bf16)."""
    if t.cached is None or t.cached[0] != device:
        w = t.weights
        t.cached = (device, tuple(None if v is None else v.to(device=device, dtype=torch.float32)
                                  for v in (w.down, w.up, t.dense, w.diff_b)))
    return t.cached[1]


def _weight_shape(module) -> tuple[int, int]:
    return (module.out_features, module.in_features)


def _dense_weight(module) -> torch.Tensor:
    """The base weight of a linear or quantised linear layer (dequantised)."""
    return module.weight.detach()
