"""CFG parallelism: a step's model passes (prompt, negative prompt, skip-layer passes) split over
the ranks of the mesh's ``cfg`` axis, their predictions all-gathered, so every rank combines the
same flows with the guidance formula and takes the same sampler step.

The loop hands its passes and a function computing one pass to :meth:`CfgParallel.run_passes`
in place of running them itself. Ranks must call the DiT the same number of times (FSDP and
Ulysses collectives inside each forward pair up across ranks), so when the passes do not split
evenly a rank short of work recomputes one of its group's passes and throws the result away; a
step with a single pass (guidance 1, CFG skipped) runs it on every rank without any exchange.

Composes with Ulysses: each cfg rank is a whole sequence group (mesh ``(cfg, sp)``), and every
rank of a sequence group ends up with the full prediction of its pass.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from wan.parallel.comm import CommCounter, all_gather, group_rank, group_size


def assign_passes(passes: Sequence[str], rank: int, size: int) -> list[tuple[int, str]]:
    """The (slot, pass) list rank ``rank`` of ``size`` computes: pass ``i`` goes to rank
    ``i % size``, in slot ``i // size``; every rank gets ``ceil(n / size)`` slots, a missing one
    filled with a repeat of pass ``i % n`` (computed, then discarded)."""
    n = len(passes)
    if n == 0:
        return []
    slots = math.ceil(n / size)
    return [(s, passes[(rank + size * s) % n]) for s in range(slots)]


class CfgParallel:
    """Runs a step's passes split over ``group`` (the mesh's ``cfg`` axis)."""

    def __init__(self, group, counter: CommCounter | None = None):
        self.group = group
        self.counter = counter
        self.size = group_size(group)
        self.rank = group_rank(group)

    def mine(self, passes: Sequence[str]) -> list[str]:
        """The passes this rank computes for ``passes`` (repeats included)."""
        if self.size == 1 or len(passes) <= 1:
            return list(passes)
        return [name for _, name in assign_passes(passes, self.rank, self.size)]

    def run_passes(self, passes: Sequence[str], compute: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{pass: prediction}`` for every pass, on every rank; ``compute(name)`` runs one pass
        here (the DiT forward of that pass: [C, F, H, W] or any shape, the same for all passes)."""
        passes = tuple(passes)
        if self.size == 1 or len(passes) <= 1:
            return {name: compute(name) for name in passes}
        local = torch.stack([compute(name) for name in self.mine(passes)])  # [slots, ...]
        gathered = all_gather(local[None], 0, self.group, self.counter)       # [size, slots, ...]
        return {name: gathered[i % self.size, i // self.size] for i, name in enumerate(passes)}
