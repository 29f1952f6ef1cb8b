"""Ulysses sequence parallelism for the Wan DiT, attached to an unchanged ``WanDiT`` from outside.

As the official Wan 2.2 (``wan/distributed/sequence_parallel.py``, ``ulysses.py``), on a group of
``n`` ranks that all run the same forward:

1. the video tokens (``L`` of them) are padded with zero tokens to a multiple of ``n`` and each
   rank keeps its contiguous ``L_pad / n`` slice; so do the per-token time embeddings of TI2V,
   the VACE control tokens (hints are computed on the slices) and the RoPE tables, padded with the
   identity rotation;
2. in each self-attention, q, k and v [B, L_pad/n, H, D] go through an all-to-all that scatters
   heads and gathers the sequence: [B, L_pad, H/n, D]; attention runs over the ``L`` real keys
   only (the padded keys are cut off: a key-length mask, like ``k_lens`` of the official flash
   call), and a second all-to-all brings the result back to [B, L_pad/n, H, D];
3. cross-attention needs nothing: its queries are this rank's tokens and its keys the text (and
   the i2v image tokens), which every rank holds whole;
4. the head runs on the slice; its output is all-gathered and the padding stripped.

Everything else in a block is per token. Padded tokens never reach a real token (they are no
key), so the result equals the single-process one up to the summation order of the attention.

Where it attaches (:class:`UlyssesParallel`, an attachment for ``wan.engine.attach``):

- ``dit.block_runner``: a runner that shards the tokens and :class:`~wan.models.dit.BlockInputs`,
  then calls the runner that was there (a step cache) or ``dit.run_blocks`` on the slices;
- a forward pre-hook on every self-attention (main and VACE blocks) swaps the attention kernel it
  is given for the Ulysses form around that same kernel (the job's backend: sdpa, sage, flash);
- hooks on ``dit.head``: the pre-hook shards a per-token time embedding, the post-hook gathers.

VACE needs nothing more: ``WanDiT.forward`` hands the patchified control tokens to the runner
(``BlockInputs.vace_tokens``) and ``WanDiT.run_blocks`` turns them into hints, so the runner
shards them with the tokens and the hints are computed on the slices.

Attach it *after* any part that sets ``block_runner`` (it wraps that runner); a forward that skips
its runner is refused rather than computed wrong.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import torch
import torch.nn as nn

from wan.models.dit import Block, VaceBlock
from wan.parallel.comm import (CommCounter, all_to_all, gather_sequence, group_rank, group_size, padded_length,
                               shard, shard_rope)
from wan.parallel.groups import ParallelConfigError, allowed_degrees


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, inner, group, seq_len: int,
                      counter: CommCounter | None = None, mask_padded_keys: bool = True) -> torch.Tensor:
    """Self-attention over the whole sequence from this rank's slice of it.

    Args:
        q, k, v: [B, L_pad/n, H, D], this rank's tokens (q and k float32 out of RoPE; they are sent
            in v's dtype, which is what every attention backend casts them to anyway).
        inner: the attention kernel (``AttentionFn``) to run on [B, L_pad, H/n, D].
        seq_len: real tokens ``L``; keys from ``L`` on are padding and are left out.
        mask_padded_keys: False lets the padded keys in (Wan 2.1's xfuser path does); tests only.
    Returns:
        [B, L_pad/n, H, D] in v's dtype.
    """
    dt = v.dtype
    q, k, v = (all_to_all(t.to(dt), 2, 1, group, counter) for t in (q, k, v))
    if mask_padded_keys and k.shape[1] > seq_len:
        k, v = k[:, :seq_len].contiguous(), v[:, :seq_len].contiguous()
    out = inner(q, k, v)
    return all_to_all(out.to(dt), 1, 2, group, counter)


@dataclasses.dataclass
class _Forward:
    """Per network, what the current forward's hooks share: set by the runner."""

    active: bool = False
    seq_len: int = 0


class _State:
    """What one network got from the part, to be taken off on detach."""

    def __init__(self, dit):
        self.dit = dit
        self.forward = _Forward()
        self.handles: list[Any] = []
        self.previous_runner = dit.block_runner


class UlyssesParallel:
    """Ulysses sequence parallelism over ``group`` for every network of a job (see the module
    docstring). ``counter`` adds up the bytes this rank sends (:mod:`wan.parallel.comm`).

    With a group of one rank it attaches nothing.
    """

    def __init__(self, group, counter: CommCounter | None = None):
        self.group = group
        self.counter = counter
        self.size = group_size(group)
        self.rank = group_rank(group)
        self.mask_padded_keys = True  # False only to show in tests that the mask matters
        self._states: dict[str, _State] = {}

    # -- attachment -------------------------------------------------------------------------------

    def attach(self, networks: Mapping[str, Any]) -> list[str]:
        if self.size == 1:
            return []
        for key, dit in networks.items():
            heads = dit.config.num_heads
            if heads % self.size:
                raise ParallelConfigError(
                    "ulysses_size", self.size,
                    f"a divisor of the model's {heads} attention heads ({allowed_degrees(heads)})")
        try:
            for key, dit in networks.items():
                self._states[key] = self._attach_one(dit)
        except BaseException:
            self.detach(networks)
            raise
        return [f"Ulysses sequence parallel on {self.size} processes"]

    def detach(self, networks: Mapping[str, Any]) -> None:
        for key, state in self._states.items():
            dit = state.dit
            for handle in state.handles:
                handle.remove()
            dit.block_runner = state.previous_runner
        self._states.clear()

    def _attach_one(self, dit) -> _State:
        state = _State(dit)
        fwd = state.forward

        def reset(module, args):
            fwd.active = False

        state.handles.append(dit.register_forward_pre_hook(reset))
        for module in dit.modules():
            if isinstance(module, (Block, VaceBlock)):
                state.handles.append(module.self_attn.register_forward_pre_hook(
                    functools.partial(self._self_attention_hook, fwd), with_kwargs=True))
        state.handles.append(dit.head.register_forward_pre_hook(functools.partial(self._head_in, fwd)))
        state.handles.append(dit.head.register_forward_hook(functools.partial(self._head_out, fwd)))
        dit.block_runner = functools.partial(self._run, state)
        return state

    # -- the forward ------------------------------------------------------------------------------

    def _shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return shard(x, dim, self.rank, self.size)

    def _per_token(self, x: torch.Tensor) -> torch.Tensor:
        """Shards a time embedding [B, L, ...] given per token; [B, 1, ...] broadcasts as it is."""
        return x if x.shape[1] == 1 else self._shard(x)

    def _run(self, state: _State, dit, tokens: torch.Tensor, inputs) -> torch.Tensor:
        """The block runner: shards, then runs the blocks (or the runner it wraps) on the slices.
        Returns this rank's slice of the blocks' output; the head hook gathers."""
        seq_len = tokens.shape[1]
        state.forward.active, state.forward.seq_len = True, seq_len
        local = self._shard(tokens)
        rope = shard_rope(inputs.rope, self.rank, self.size)
        e0 = self._per_token(inputs.e0)
        # VACE: the control tokens are sliced like the tokens (run_blocks makes the hints from
        # them); hints a caller computed on the whole sequence are sliced as they are
        hints = None if inputs.hints is None else [self._shard(h) for h in inputs.hints]
        vace_tokens = None if inputs.vace_tokens is None else self._shard(inputs.vace_tokens)
        local_inputs = dataclasses.replace(inputs, e=self._per_token(inputs.e), e0=e0, rope=rope,
                                           hints=hints, vace_tokens=vace_tokens)
        if state.previous_runner is not None:
            return state.previous_runner(dit, local, local_inputs)
        return dit.run_blocks(local, local_inputs)

    def _self_attention_hook(self, fwd: _Forward, module: nn.Module, args: tuple, kwargs: dict):
        """Gives a self-attention the Ulysses form of the kernel it was called with."""
        if not fwd.active:
            raise RuntimeError("UlyssesParallel: a self-attention ran outside the Ulysses block runner; attach "
                               "UlyssesParallel after any part that sets dit.block_runner")
        wrap = functools.partial(ulysses_attention, group=self.group, seq_len=fwd.seq_len, counter=self.counter,
                                 mask_padded_keys=self.mask_padded_keys)
        if "attention" in kwargs:
            kwargs = {**kwargs, "attention": functools.partial(wrap, inner=kwargs["attention"])}
        else:
            args = (*args[:2], functools.partial(wrap, inner=args[2]), *args[3:])
        return args, kwargs

    def _head_in(self, fwd: _Forward, module: nn.Module, args: tuple):
        if not fwd.active:
            return None
        x, e = args
        return x, self._per_token(e)

    def _head_out(self, fwd: _Forward, module: nn.Module, args: tuple, output: torch.Tensor):
        if not fwd.active:
            return None
        fwd.active = False
        out = gather_sequence(output, 1, self.group, self.counter)
        return out[:, :fwd.seq_len]


def sequence_slices(seq_len: int, ranks: int) -> list[tuple[int, int]]:
    """The [start, stop) token range of each rank, real tokens only (the last ones may be short or
    empty): what :func:`~wan.parallel.comm.shard` keeps."""
    m = padded_length(seq_len, ranks) // ranks
    return [(min(r * m, seq_len), min((r + 1) * m, seq_len)) for r in range(ranks)]
