"""The collectives of the parallel layer, each wrapped once so that every byte sent is counted.

Everything the Ulysses and CFG-parallel parts send goes through :func:`all_to_all` and
:func:`all_gather`; a :class:`CommCounter` passed to them adds up what this rank sends to the other
ranks, which is what :mod:`wan.parallel.perf_model` predicts (and a test holds the two equal).

What "sent" means, per call on a group of ``n`` ranks, for an input of ``b`` bytes:

- ``all_to_all``: the input is cut into ``n`` equal chunks, one per rank; the chunk for this rank
  stays here, so ``b * (n - 1) / n`` bytes leave.
- ``all_gather``: this rank's whole input goes to each of the ``n - 1`` others: ``b * (n - 1)``
  (what each rank sends in NCCL's ring all-gather too).

Gradients: with autograd recording and an input that requires grad, :func:`all_to_all` uses the
autograd-aware functional collective (its backward is the reverse all-to-all), as LoRA training
through a sequence-parallel DiT needs. :func:`gather_sequence` assumes what the DiT's use of it
means: every rank goes on with the *same* gathered tensor (the loss is replicated), so its backward
keeps this rank's slice of the incoming gradient rather than summing the ranks' (identical) copies.
Parameter gradients are then partial per rank (each holds its tokens' share) and the trainer sums
them over the sequence group, as it does over data-parallel ranks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class CommCounter:
    """Bytes this rank sent and calls it made, per kind of collective (``all_to_all``,
    ``all_gather``)."""

    bytes_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_sent[kind] += int(nbytes)
        self.calls[kind] += 1

    @property
    def total(self) -> int:
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()


def group_size(group) -> int:
    """Ranks in ``group`` (None: the world); 1 without torch.distributed."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def _records_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group,
               counter: CommCounter | None = None) -> torch.Tensor:
    """Cuts ``x`` into ``n`` equal chunks along ``scatter_dim``, sends chunk ``j`` to rank ``j`` of
    ``group`` and concatenates what arrives along ``gather_dim``, in rank order.

    For Ulysses: [B, L/n, H, D] with (scatter 2, gather 1) -> [B, L, H/n, D], and back with (1, 2).
    One ``all_to_all_single`` on a stacked copy (chunk j at index j of dim 0).
    """
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[scatter_dim] % n:
        raise ValueError(f"all_to_all: dim {scatter_dim} of shape {tuple(x.shape)} is not divisible by {n} ranks")
    send = torch.stack(x.chunk(n, dim=scatter_dim))  # [n, ...], contiguous
    if _records_grad(send):
        import torch.distributed._functional_collectives as fc
        recv = fc.wait_tensor(fc.all_to_all_single_autograd(send, None, None, group))
    else:
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
    if counter is not None:
        counter.add("all_to_all", send.numel() * send.element_size() * (n - 1) // n)
    return torch.cat(recv.unbind(0), dim=gather_dim)


# torch 2.13 renames all_gather_into_tensor (and warns on the old name)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather(x: torch.Tensor, dim: int, group, counter: CommCounter | None = None) -> torch.Tensor:
    """Concatenates every rank's ``x`` (same shape everywhere) along ``dim``, in rank order; no
    gradient (see :func:`gather_sequence` for the differentiable form)."""
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))  # rank-major along dim 0 (what gloo accepts)
    _all_gather_single(out, x, group=group)
    if counter is not None:
        counter.add("all_gather", x.numel() * x.element_size() * (n - 1))
    return torch.cat(out.chunk(n), dim=dim)


class _GatherReplicated(torch.autograd.Function):
    """all_gather whose output every rank uses alike: backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, dim, group, counter):
        ctx.dim, ctx.rank, ctx.size = dim, group_rank(group), x.shape[dim]
        with torch.no_grad():
            return all_gather(x, dim, group, counter)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None, None, None


def gather_sequence(x: torch.Tensor, dim: int, group, counter: CommCounter | None = None) -> torch.Tensor:
    """:func:`all_gather` of this rank's slice of a sequence; differentiable (see the module
    docstring for what its gradient means)."""
    if group_size(group) == 1:
        return x
    if _records_grad(x):
        return _GatherReplicated.apply(x, dim, group, counter)
    return all_gather(x, dim, group, counter)


# ---------------------------------------------------------------------------------------------
# Sequence slices (pure: rank and size are arguments)


def padded_length(length: int, ranks: int) -> int:
    """``length`` rounded up to a multiple of ``ranks``."""
    return math.ceil(length / ranks) * ranks


def shard(x: torch.Tensor, dim: int, rank: int, ranks: int, value: float = 0.0) -> torch.Tensor:
    """Rank ``rank``'s slice of ``x`` along ``dim`` after padding it with ``value`` to a multiple of
    ``ranks``: the contiguous positions ``[rank * m, (rank + 1) * m)``, ``m = padded / ranks``."""
    length = x.shape[dim]
    m = padded_length(length, ranks) // ranks
    start, stop = rank * m, (rank + 1) * m
    if stop <= length:
        return x.narrow(dim, start, m)
    part = x.narrow(dim, min(start, length), max(0, length - start))
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [0, m - part.shape[dim]]
    return F.pad(part, pad, value=value)


def shard_rope(rope: tuple[torch.Tensor, torch.Tensor], rank: int, ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s rows of the RoPE tables (cos, sin) ``[L, head_dim/2]``, padded with the
    identity rotation (cos 1, sin 0), which is the official code's padding of the complex
    frequencies with ones."""
    cos, sin = rope
    return shard(cos, 0, rank, ranks, value=1.0), shard(sin, 0, rank, ranks, value=0.0)
