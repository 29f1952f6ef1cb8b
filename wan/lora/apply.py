"""Applying LoRAs to a loaded DiT at run time, without touching or reloading its weights.

Each targeted linear layer gets a forward hook that adds, for every LoRA on it, the LoRA's output
times the multiplier in effect: the low-rank path ``scale * up(down(x))`` for plain LoRAs (cheap,
and it works on fp8/int8 quantised bases), ``x @ delta^T`` for LyCORIS and full deltas, plus the
bias delta. DoRA rescales the merged weight per output row, so a layer with a DoRA LoRA computes
its output from the merged weight instead. Detaching removes the hooks: the base outputs come
back exactly, since the base weights were never changed.

The multiplier of each LoRA can change per step and per expert (``set_step``), as the strength
schedules of ``wan.lora.schedule`` describe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class LoraUse:
    """One LoRA as a job uses it: its weights (``wan.lora.formats.LoraFile``), the multiplier
    (anything with ``at(step, steps, expert) -> float``), and which modules it may touch."""

    lora: object
    multiplier: object
    allow: Callable[[str], bool] = lambda name: True


@dataclass
class _Term:
    weights: object        # LoraWeights
    use: int               # index into the runtime's uses
    dense: torch.Tensor | None = None  # delta for non-low-rank kinds, computed once


@dataclass
class LoraRuntime:
    """The LoRAs attached to one DiT for one job (``attach`` / ``detach``)."""

    uses: list[LoraUse]
    _multipliers: list[float] = field(default_factory=list)
    _hooks: list = field(default_factory=list)
    attached: dict[str, int] = field(default_factory=dict)  # module name -> number of LoRAs on it

    def attach(self, dit) -> None:
        """Installs hooks on every linear layer of ``dit`` that some LoRA targets and may touch."""
        if self._hooks:
            raise RuntimeError("LoraRuntime.attach: already attached; detach first")
        modules = dict(dit.named_modules())
        per_module: dict[str, list[_Term]] = {}
        for i, use in enumerate(self.uses):
            for name, weights in use.lora.targets.items():
                if name in modules and use.allow(name):
                    per_module.setdefault(name, []).append(_Term(weights, i))
        for name, terms in per_module.items():
            module = modules[name]
            for term in terms:
                if term.weights.kind != "lora":
                    term.dense = term.weights.delta(_weight_shape(module)).float()
            self._hooks.append(module.register_forward_hook(self._hook(module, terms)))
            self.attached[name] = len(terms)
        self._multipliers = [self._initial(u) for u in self.uses]

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.attached.clear()

    def set_step(self, step: int, steps: int, expert: str = "transformer", switch_step: int | None = None) -> None:
        """Multipliers in effect from now on: each LoRA's value at (step, expert); ``switch_step``
        is the first low-noise step of a Wan 2.2 A14B run (per-expert schedules spread over it)."""
        self._multipliers = [u.multiplier.at(step, steps, expert, switch_step) for u in self.uses]

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

    def _hook(self, module, terms: list[_Term]):
        def hook(mod, args, out):
            x = args[0]
            if any(t.weights.dora_scale is not None for t in terms):
                return self._dora_output(mod, x, terms, out)
            extra = None
            for t in terms:
                m = self._multipliers[t.use]
                if m == 0:
                    continue
                y = _term_output(t, x) * m
                extra = y if extra is None else extra + y
            return out if extra is None else out + extra.to(out.dtype)
        return hook

    def _dora_output(self, mod, x, terms, out):
        """DoRA: W' = magnitude * (W + dW) / ||W + dW|| (per output row), output from W'."""
        w = _dense_weight(mod).float()
        for t in terms:
            m = self._multipliers[t.use]
            delta = t.dense if t.dense is not None else t.weights.delta(tuple(w.shape)).float()
            merged = w + m * delta
            if t.weights.dora_scale is not None and m != 0:
                norm = merged.norm(dim=1, keepdim=True)
                merged = t.weights.dora_scale.float().reshape(-1, 1) * merged / norm
            w = merged
        bias = None if getattr(mod, "bias", None) is None else mod.bias.float()
        for t in terms:
            if t.weights.diff_b is not None:
                bias = (0 if bias is None else bias) + self._multipliers[t.use] * t.weights.diff_b.float()
        return F.linear(x.float(), w, bias).to(out.dtype)


def _term_output(t: _Term, x: torch.Tensor) -> torch.Tensor:
    """One LoRA's contribution to a layer's output at multiplier 1 (float32)."""
    w = t.weights
    xf = x.float()
    if w.kind == "lora":
        rank = w.down.shape[0]
        scale = (w.alpha / rank) if w.alpha is not None else 1.0
        y = F.linear(F.linear(xf, w.down.float()), w.up.float()) * scale
    else:
        y = F.linear(xf, t.dense)
    if w.diff_b is not None:
        y = y + w.diff_b.float()
    return y


def _weight_shape(module) -> tuple[int, int]:
    return (module.out_features, module.in_features)


def _dense_weight(module) -> torch.Tensor:
    """The base weight of a linear or quantised linear layer (dequantised)."""
    return module.weight.detach()
