"""TeaCache and MagCache for the Wan DiT, and the block runner that applies step caches and
skipped layers.

TeaCache skips the transformer blocks at steps where their input barely changed, adding the
residual (blocks' output minus input) cached at the last computed step instead. The change is
the relative L1 distance of the time embedding between steps, rescaled by a polynomial fitted per
model (the published coefficients below), and accumulated; a step is computed when the sum
reaches the threshold, which resets it. The first steps and the last step are always computed;
the prompt and negative-prompt passes keep separate residuals.

Because the time embedding depends only on the timestep, the whole schedule is known before the
run: :func:`teacache_schedule` computes it, and :func:`calibrate_teacache` picks the threshold
whose number of computed steps is closest to ``steps / speedup``.

MagCache decides the same way from a table of the residual's magnitude ratios between steps,
which must be measured on the model (:class:`MagnitudeRecorder`); ``wan.optim.magcache_tables``
records one per model on a first plain run and keeps it for the next ones.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

# Published TeaCache polynomials for Wan 2.1 (distance of the time embedding e), highest power first.
TEACACHE_COEFFICIENTS = {
    "t2v-1.3B": (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01),
    "t2v-14B": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    "i2v-480P": (-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01),
    "i2v-720P": (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
}


def teacache_coefficients(model_id: str, dim: int, model_type: str) -> tuple[float, ...] | None:
    """The published polynomial for a model, or None (distances are then used unscaled)."""
    mid = model_id.lower()
    if model_type in ("i2v", "flf2v") and dim == 5120:
        return TEACACHE_COEFFICIENTS["i2v-720P" if "720" in mid else "i2v-480P"]
    if dim == 1536:
        return TEACACHE_COEFFICIENTS["t2v-1.3B"]
    if dim == 5120:
        return TEACACHE_COEFFICIENTS["t2v-14B"]
    return None


def time_embeddings(dit, timesteps: torch.Tensor) -> list[torch.Tensor]:
    """The DiT's time embedding e at each timestep (what TeaCache measures)."""
    with torch.inference_mode():
        return [dit._time_embedding(t.reshape(1).to(dit.patch_embedding.weight.device), 0)[0] for t in timesteps]


def teacache_schedule(embeddings: list[torch.Tensor], threshold: float, coefficients=None,
                      start_steps: int = 1) -> list[bool]:
    """Which steps compute the blocks (True) and which reuse the cached residual (False).

    A threshold <= 0 computes every step (TeaCache off, exactly the uncached result).
    """
    steps = len(embeddings)
    if threshold <= 0:
        return [True] * steps
    rescale = np.poly1d(coefficients) if coefficients is not None else (lambda v: v)
    out, acc, prev = [], 0.0, None
    for i, e in enumerate(embeddings):
        if i < max(1, start_steps) or i == steps - 1 or prev is None:
            compute, acc = True, 0.0
        else:
            acc += float(rescale(((e - prev).abs().mean() / prev.abs().mean()).item()))
            compute = acc >= threshold
            if compute:
                acc = 0.0
        prev = e
        out.append(compute)
    return out


def calibrate_teacache(embeddings: list[torch.Tensor], speedup: float, coefficients=None,
                       start_steps: int = 1) -> tuple[float, list[bool]]:
    """The threshold whose computed-step count is closest to ``steps / speedup``, and its schedule.

    As Wan2GP, the smallest best threshold of 0.01..0.60 in steps of 0.01 (the range of the
    published polynomials). When that range cannot get within one step of the target (models
    without a polynomial, whose raw distances are larger), the search widens by bisection: the
    computed-step count only falls as the threshold rises.
    """
    target = len(embeddings) / speedup

    def count(thr: float) -> int:
        return sum(teacache_schedule(embeddings, thr, coefficients, start_steps))

    best = min((abs(count(k / 100) - target), k / 100) for k in range(1, 61))
    if best[0] > 1:
        lo, hi = 0.6, 0.6
        while count(hi) > target and hi < 1e6:
            hi *= 2
        for _ in range(60):  # count(lo) > target >= count(hi)
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if count(mid) > target else (lo, mid)
        best = min((abs(count(t) - target), t) for t in (lo, hi))
    threshold = best[1]
    return threshold, teacache_schedule(embeddings, threshold, coefficients, start_steps)


@dataclass
class StepRunner:
    """Installed as ``dit.block_runner`` for one generation: runs the blocks of the current pass,
    leaving out skipped layers, or reuses the pass's cached residual at steps the cache skips.

    ``schedule`` is one list for every pass (TeaCache), or one list per kind of pass ("cond",
    "uncond": MagCache, whose passes have their own magnitude tables); a batched "cond+uncond"
    pass is computed when either of its kinds is. Residuals are kept per pass name
    ("<expert>/<kind>"), so an expert never reuses another's. The loop calls :meth:`begin`
    before each model pass.
    """

    schedule: list[bool] | dict[str, list[bool]] | None = None  # compute the blocks at step i?
    step: int = 0
    pass_name: str = "cond"
    skip: frozenset[int] = frozenset()
    residuals: dict = field(default_factory=dict)
    computed: int = 0                      # block runs (for tests and reports)
    reused: int = 0

    def begin(self, step: int, pass_name: str, skip: frozenset[int] = frozenset()) -> None:
        self.step, self.pass_name, self.skip = step, pass_name, skip

    def scheduled(self) -> bool:
        """Whether the schedule computes the current pass at the current step."""
        if isinstance(self.schedule, dict):
            kinds = self.pass_name.rsplit("/", 1)[-1].split("+")
            return any(self.schedule[k][self.step] if k in self.schedule else True for k in kinds)
        return self.schedule is None or self.schedule[self.step]

    def __call__(self, dit, tokens: torch.Tensor, inputs) -> torch.Tensor:
        if self.skip:  # skip-layer passes are never cached
            self.computed += 1
            return dit.run_blocks(tokens, inputs, self.skip)
        cached = self.residuals.get(self.pass_name)
        if not self.scheduled() and cached is not None and cached.shape == tokens.shape:
            self.reused += 1
            return tokens + cached
        out = dit.run_blocks(tokens, inputs)
        self.computed += 1
        if self.schedule is not None:
            self.residuals[self.pass_name] = out - tokens
        return out


# ---------------------------------------------------------------------------------------------
# MagCache


def magcache_schedule(ratios: list[float], threshold: float, max_skips: int = 2, start_steps: int = 1,
                      forced: Collection[int] = ()) -> list[bool]:
    """MagCache: which steps compute the blocks, from the magnitude ratios of the blocks' residual
    between consecutive steps (``ratios[i]`` = |residual_i| / |residual_{i-1}|, ratios[0] unused).

    While skipping, the product of the ratios since the last computed step estimates how far the
    cached residual is off; the error |1 - product| accumulates, and a step is computed when it
    reaches ``threshold`` or after ``max_skips`` skips in a row. The first steps, the last and the
    steps in ``forced`` (e.g. the first step of a second expert, whose residual nothing cached
    yet) are always computed; a threshold <= 0 computes every step.
    """
    steps = len(ratios)
    if threshold <= 0:
        return [True] * steps
    out, ratio, err, skips = [], 1.0, 0.0, 0
    for i, r in enumerate(ratios):
        if i < max(1, start_steps) or i == steps - 1 or i in forced:
            compute = True
        else:
            ratio *= r
            err += abs(1.0 - ratio)
            compute = err >= threshold or skips >= max_skips
        if compute:
            ratio, err, skips = 1.0, 0.0, 0
        else:
            skips += 1
        out.append(compute)
    return out


def calibrate_magcache(ratios: list[float], speedup: float, max_skips: int = 2,
                       start_steps: int = 1, forced: Collection[int] = ()) -> tuple[float, list[bool]]:
    """The smallest threshold of :data:`MAGCACHE_THRESHOLDS` whose computed-step count is closest
    to ``steps / speedup``, and its schedule (max_skips bounds what any threshold can reach)."""
    threshold, schedules = calibrate_magcache_passes({"all": ratios}, speedup, max_skips, start_steps,
                                                     {"all": forced})
    return threshold, schedules["all"]


MAGCACHE_THRESHOLDS = [k / 100 for k in range(1, 101)] + [round(1.25 ** k, 4) for k in range(1, 25)]


def calibrate_magcache_passes(tables: Mapping[str, list[float]], speedup: float, max_skips: int = 2,
                              start_steps: int = 1, forced: Mapping[str, Collection[int]] | None = None
                              ) -> tuple[float, dict[str, list[bool]]]:
    """One threshold for several passes, each with its own ratio table (same length) and forced
    steps: the smallest of :data:`MAGCACHE_THRESHOLDS` whose mean computed-step count over the
    passes is closest to ``steps / speedup``, and each pass's schedule at that threshold.

    The grid is 0.01..1.0 (published MagCache thresholds lie well inside it), then rises
    geometrically for tables whose ratios stray far from 1 (random weights); past the point where
    ``max_skips`` alone bounds the schedule, a higher threshold changes nothing.
    """
    steps = len(next(iter(tables.values())))
    target = steps / speedup

    def schedules(thr: float) -> dict[str, list[bool]]:
        return {k: magcache_schedule(r, thr, max_skips, start_steps, (forced or {}).get(k, ()))
                for k, r in tables.items()}

    def miss(thr: float) -> float:
        return abs(sum(sum(s) for s in schedules(thr).values()) / len(tables) - target)

    best = min((miss(thr), thr) for thr in MAGCACHE_THRESHOLDS)[1]
    return best, schedules(best)


class MagnitudeRecorder:
    """A block runner that records |residual| of each pass at each step (MagCache calibration);
    the blocks run exactly as without it, so the output is the plain one.

    ``norms[pass name][step]`` is the mean over tokens of the L2 norm of the residual (blocks'
    output minus input). A batched "<expert>/cond+uncond" pass is recorded as its two passes
    "<expert>/cond" and "<expert>/uncond" (batch items 0 and 1). ``ratios(pass)`` gives the
    per-step ratio table of one pass from a plain run.
    """

    def __init__(self):
        self.step, self.pass_name, self.skip = 0, "cond", frozenset()
        self.norms: dict[str, dict[int, float]] = {}

    def begin(self, step: int, pass_name: str, skip: frozenset[int] = frozenset()) -> None:
        self.step, self.pass_name, self.skip = step, pass_name, skip

    def __call__(self, dit, tokens: torch.Tensor, inputs) -> torch.Tensor:
        out = dit.run_blocks(tokens, inputs, self.skip)
        per_item = (out - tokens).float().norm(dim=-1).mean(dim=-1)  # [B]
        prefix, _, kinds = self.pass_name.rpartition("/")
        names = kinds.split("+")
        if len(names) == per_item.shape[0] and len(names) > 1:
            for name, value in zip(names, per_item.tolist()):
                self.norms.setdefault(f"{prefix}/{name}" if prefix else name, {})[self.step] = value
        else:
            self.norms.setdefault(self.pass_name, {})[self.step] = per_item.mean().item()
        return out

    def ratios(self, pass_name: str) -> list[float]:
        norms = self.norms[pass_name]
        steps = sorted(norms)
        return [1.0] + [norms[b] / norms[a] for a, b in zip(steps, steps[1:])]
