"""Where each LoRA target goes (a hook or the weights), and merging into the weights exactly.

Two ways to apply a LoRA (``LoraRuntime(mode=...)`` in :mod:`wan.lora.apply`, the profile's
``lora.mode``):

* ``hooks`` (the default, also what ``auto`` means): a forward hook adds the LoRA's output to the
  layer's output. The base weights are never written; each step pays the extra low-rank path.
* ``merge``: ``W + m * delta`` is written into the layer's weight (alpha/rank folded into delta,
  LoHa/LoKr/full ``diff`` expanded, the DoRA rescale ``magnitude * W' / ||W'||`` per output row, the
  bias delta ``diff_b`` into the bias), so a step costs what the base model costs.

Exact unmerge. Before a weight is first written, its original value is copied aside to CPU
memory (whatever device the model runs on: the accelerator only ever holds the merged weight), and
detaching copies it back into the same tensor. We never subtract the delta: ``(W + d) - d`` is not
``W`` in floating point (bf16 keeps 8 bits of mantissa), so the base would drift job after job. The
price is one CPU copy of every touched weight while the job runs.

Precision: the merge is computed in float32 and rounded once to the weight's dtype, where the hook
path adds the LoRA's output in float32. In bf16 the two differ slightly (0.6% of the output on the
1.3B-shape benchmark, where the LoRA itself changes it by 8.5%); in float32 they agree to ~1e-7.

Multiplier schedules in merge mode: when the multiplier in effect changes (a per-step schedule, the
switch between Wan 2.2 experts), the layers of the LoRAs whose value changed are merged again from
the kept originals; steps that keep the same values write nothing.

Layers that cannot take a merged weight keep the hook path, with a notice: quantised layers
(:class:`wan.layers.quant.QuantLinear`: an 8-bit weight cannot hold ``W + delta`` without rounding
it), any weight stored in a non-float dtype (fp8, int8), blocks streamed from the checkpoint (their
weights are placeholders between forwards), and linear layers without a bias when the LoRA carries a
bias delta.

Targets that are not linear layers (norms, convs, bare parameters such as ``blocks.0.modulation``,
which distillation LoRAs carry as ``diff``) cannot be expressed as an added output, so they are
merged (and restored exactly) in either mode; where that is impossible they are skipped with a
notice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

MERGE_MODES = ("hooks", "merge", "auto")
# What "auto" means. Hooks: no RAM copy of the touched weights, every base (quantised, streamed),
# the LoRA computed in float32, and a switch costs nothing. Merge is faster per step and pays for
# its merge after ~10 forwards on the CPU benchmark (benchmarks/README.md), for a RAM copy.
AUTO_MODE = "hooks"
_MERGEABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def resolve_mode(mode: str) -> str:
    """``hooks`` | ``merge`` (``auto`` -> :data:`AUTO_MODE`); ValueError naming the allowed values."""
    if mode not in MERGE_MODES:
        raise ValueError(f"LoRA mode {mode!r} is not one of {', '.join(MERGE_MODES)}")
    return AUTO_MODE if mode == "auto" else mode


@dataclass
class Term:
    """One LoRA on one target."""

    weights: object                    # wan.lora.formats.LoraWeights
    use: int                           # index of the LoraUse (and of its multiplier)
    dense: torch.Tensor | None = None  # hook path: the delta of a non-low-rank kind, computed once
    cached: tuple | None = None        # hook path: (device, float32 factors there), see apply._factors


@dataclass
class Placement:
    """How one target is applied: ``hook`` (module gets a forward hook), ``merge`` (``weight``,
    and ``bias`` when a term has ``diff_b``, are written) or ``skip`` (``why`` says why)."""

    name: str
    terms: list[Term]
    how: str
    module: nn.Module | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    why: str = ""


def is_linear(module: nn.Module | None) -> bool:
    """nn.Linear and QuantLinear alike: what the hook path knows how to add an output to."""
    return module is not None and hasattr(module, "in_features") and hasattr(module, "out_features")


def place_targets(dit: nn.Module, uses: list, mode: str) -> list[Placement]:
    """One placement per target of ``uses`` (``LoraUse`` list) that exists in ``dit`` and that the
    use's ``allow`` filter accepts, in the order first met. ``mode``: hooks | merge | auto."""
    mode = resolve_mode(mode)
    modules = dict(dit.named_modules())
    terms: dict[str, list[Term]] = {}
    for i, use in enumerate(uses):
        for name, weights in use.lora.targets.items():
            if use.allow(name) and (name in modules or _bare_parameter(dit, name) is not None):
                terms.setdefault(name, []).append(Term(weights, i))
    return [_place(name, ts, modules.get(name), dit, mode) for name, ts in terms.items()]


def _bare_parameter(dit: nn.Module, name: str) -> torch.Tensor | None:
    try:
        return dit.get_parameter(name)
    except AttributeError:
        return None


def _place(name: str, terms: list[Term], module, dit, mode: str) -> Placement:
    if module is not None:
        weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    else:
        weight, bias = _bare_parameter(dit, name), None
    linear = is_linear(module)
    shape = (module.out_features, module.in_features) if linear else (None if weight is None else tuple(weight.shape))
    misfit = _misfit(terms, shape)
    if misfit:  # compat counted it as a mismatch; applying it would fail at the first forward
        return Placement(name, terms, "skip", module, why=misfit)
    why = _merge_blocker(module, weight, bias, terms)
    if why is None and (mode == "merge" or not linear):
        return Placement(name, terms, "merge", module, weight, bias)
    if linear:
        return Placement(name, terms, "hook", module, why=why or "")
    return Placement(name, terms, "skip", module, why=why)


def _misfit(terms: list[Term], shape: tuple | None) -> str:
    """Why the LoRAs' tensors do not fit a target of weight ``shape`` ('' when they do)."""
    from wan.lora.compat import fits  # the rule the compatibility check applies
    if shape is None:
        return "it holds no weight to take the LoRA"
    for t in terms:
        if not fits(t.weights, shape):
            lora_shape = t.weights.weight_shape() or tuple(t.weights.diff_b.shape)
            return f"the LoRA's shape {lora_shape} does not fit the model's {shape}"
    return ""


def _merge_blocker(module, weight, bias, terms: list[Term]) -> str | None:
    """Why this target's weights cannot take a merged LoRA exactly, or None when they can."""
    if weight is None:
        mode = getattr(module, "mode", None)
        return f"its weight is quantised ({mode})" if mode else "it holds no weight parameter"
    if weight.is_meta:
        return "its weights are streamed from the checkpoint (not resident)"
    if weight.dtype not in _MERGEABLE_DTYPES:
        return f"its weight is stored in {str(weight.dtype).removeprefix('torch.')}"
    if any(t.weights.diff_b is not None for t in terms):
        if bias is None:
            return "it has no bias to take the LoRA's bias delta"
        if bias.is_meta or bias.dtype not in _MERGEABLE_DTYPES:
            return f"its bias cannot be written ({bias.dtype}, {bias.device})"
    return None


def placement_notices(placements: list[Placement], mode: str) -> list[str]:
    """Lines for the job's notices: merge-mode layers that kept hooks, targets that were skipped."""
    groups: dict[tuple[str, str], list[str]] = {}
    for p in placements:
        if p.how == "skip" or (p.how == "hook" and p.why and resolve_mode(mode) == "merge"):
            groups.setdefault((p.how, p.why), []).append(p.name)
    lines = []
    for (how, why), names in groups.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        if how == "hook":
            lines.append(f"LoRA merge: {len(names)} layers keep the LoRA as hooks because {why}: {shown}")
        else:
            lines.append(f"LoRA: {len(names)} targets not applied because {why}: {shown}")
    return lines


# ---------------------------------------------------------------------------------------------
# The merged weight


def merged_weight(base: torch.Tensor, terms: list[Term], multipliers: list[float],
                  device: torch.device | str | None = None, rows: slice = slice(None)) -> torch.Tensor:
    """``base`` (the weight, any float dtype, its own shape, e.g. [out, in]) with each LoRA merged
    in order: ``W <- W + m * delta``, then for a DoRA LoRA ``W <- magnitude * W / ||W||`` (norm of
    each output row, over every other axis). A LoRA at multiplier 0 is left out entirely (DoRA
    included), so all-zero multipliers give ``base`` back unchanged.

    ``rows``: only these output rows (every step above is row-wise), so a large weight can be
    merged in cache-sized pieces. Returns a new float32 tensor of ``base[rows]``'s shape on
    ``device`` (default: base's); ``base`` itself is never written (it may be the layer's own
    weight, or the kept original).
    """
    if all(multipliers[t.use] == 0 for t in terms):
        return base[rows]
    # One float32 copy, then everything in place: a 1.3B model merges ~1.4e9 values, and each
    # extra temporary would be another full pass over memory.
    w = base[rows].to(device=device or base.device, dtype=torch.float32, copy=True)
    for t in terms:
        m = multipliers[t.use]
        if m == 0:
            continue
        _add_delta_(w, t, m, tuple(base.shape), rows)
        if t.weights.dora_scale is not None:
            lead = (-1,) + (1,) * (w.dim() - 1)
            norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(lead)
            scale = t.weights.dora_scale.reshape(-1)[rows].to(device=w.device, dtype=torch.float32)
            w.mul_(scale.reshape(lead) / norm)
    return w


def _add_delta_(w: torch.Tensor, t: Term, m: float, shape: tuple, rows: slice) -> None:
    """``w += m * delta[rows]`` of one term, in place (float32 ``w``, contiguous; ``shape``: the
    whole weight's). A plain LoRA is one fused ``addmm`` on ``w``'s device: the [out, in] delta is
    never built."""
    lw = t.weights
    if _low_rank(t):
        up = lw.up.flatten(1)[rows].to(device=w.device, dtype=torch.float32)
        down = lw.down.flatten(1).to(device=w.device, dtype=torch.float32)
        w.view(up.shape[0], down.shape[1]).addmm_(up, down, alpha=m * lw.scale())
        return
    delta = t.dense if t.dense is not None else lw.delta(shape)
    w.add_(delta[rows].to(device=w.device, dtype=torch.float32).reshape(w.shape), alpha=m)


def _low_rank(t: Term) -> bool:
    return t.dense is None and t.weights.kind == "lora" and t.weights.diff is None


def merged_bias(base: torch.Tensor | None, terms: list[Term], multipliers: list[float]) -> torch.Tensor | None:
    """``base`` (float32 [out] or None) plus ``m * diff_b`` of each LoRA that has one (float32)."""
    b = base
    for t in terms:
        m = multipliers[t.use]
        if t.weights.diff_b is not None and m != 0:
            d = m * t.weights.diff_b.to(dtype=torch.float32, device=None if b is None else b.device).reshape(-1)
            b = d if b is None else b + d
    return b


# ---------------------------------------------------------------------------------------------
# Writing and restoring


@dataclass
class _Slot:
    placement: Placement
    kept_weight: torch.Tensor | None = None  # CPU copy of the original, taken at the first write
    kept_bias: torch.Tensor | None = None
    written: tuple[float, ...] | None = None  # multipliers merged in now; None: the original

    @property
    def writes_bias(self) -> bool:
        return self.placement.bias is not None and any(t.weights.diff_b is not None for t in self.placement.terms)


@dataclass
class WeightMerge:
    """The merged targets of one DiT for one job: :meth:`apply` (merge at these multipliers, only
    where they changed) and :meth:`restore` (originals back, bit for bit)."""

    slots: list[_Slot] = field(default_factory=list)
    writes: int = 0  # target writes so far (merges and restores): lets tests see what a step costs

    @classmethod
    def of(cls, placements: list[Placement]) -> WeightMerge:
        return cls([_Slot(p) for p in placements if p.how == "merge"])

    @property
    def names(self) -> list[str]:
        return [s.placement.name for s in self.slots]

    def apply(self, multipliers: list[float]) -> None:
        """Makes every merged target hold its LoRAs at ``multipliers`` (indexed by use)."""
        with torch.no_grad():
            for slot in self.slots:
                key = tuple(multipliers[t.use] for t in slot.placement.terms)
                wanted = key if any(m != 0 for m in key) else None
                if wanted != slot.written:
                    self._write(slot, multipliers if wanted is not None else None)
                    slot.written = wanted

    def restore(self) -> None:
        """Copies the kept originals back into the same tensors and forgets them."""
        with torch.no_grad():
            for slot in self.slots:
                if slot.kept_weight is not None:
                    slot.placement.weight.copy_(slot.kept_weight)
                    if slot.kept_bias is not None:
                        slot.placement.bias.copy_(slot.kept_bias)
                    self.writes += 1
                slot.kept_weight = slot.kept_bias = slot.written = None

    def _write(self, slot: _Slot, multipliers: list[float] | None) -> None:
        p = slot.placement
        if slot.kept_weight is None:
            slot.kept_weight = p.weight.detach().to("cpu", copy=True)
            if slot.writes_bias:
                slot.kept_bias = p.bias.detach().to("cpu", copy=True)
        if multipliers is None:  # every multiplier 0: the original itself, not a recomputation
            p.weight.copy_(slot.kept_weight)
            if slot.kept_bias is not None:
                p.bias.copy_(slot.kept_bias)
        else:
            for rows in _row_chunks(p.weight, p.terms):
                p.weight[rows].copy_(merged_weight(slot.kept_weight, p.terms, multipliers, p.weight.device, rows))
            if slot.kept_bias is not None:
                base_b = slot.kept_bias.to(device=p.bias.device, dtype=torch.float32)
                p.bias.copy_(merged_bias(base_b, p.terms, multipliers))
        self.writes += 1


# Float32 rows merged at a time on the CPU: small enough to stay in cache between reading the kept
# original, adding the delta and writing the weight, which on a 1.3B model makes merging ~2x faster
# than whole-weight temporaries (benchmarks/bench_lora.py).
_CPU_CHUNK_VALUES = 1 << 20


def _row_chunks(weight: torch.Tensor, terms: list[Term]) -> list[slice]:
    """Row ranges to merge one at a time: pieces of ~4 MiB of float32 on the CPU when every LoRA
    on the layer is low-rank (a dense delta is built whole anyway), else the whole weight."""
    if weight.device.type != "cpu" or weight.dim() < 2 or not all(_low_rank(t) for t in terms):
        return [slice(None)]
    out_f = weight.shape[0]
    step = max(1, _CPU_CHUNK_VALUES // max(1, weight[0].numel()))
    return [slice(i, min(i + step, out_f)) for i in range(0, out_f, step)]
