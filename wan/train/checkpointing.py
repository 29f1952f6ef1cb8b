"""Gradient checkpointing (``--gradient_checkpointing``), attached to the DiTs from outside."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


class GradientCheckpointing:
    """Recomputes each DiT block in the backward pass (``torch.utils.checkpoint``, non-reentrant), put
    on from outside the network by replacing each block's ``forward`` on the instance; detach restores it.
    Random draws inside a block (LoRA dropout) are replayed identically in the recomputation, and so are
    the block's own forward hooks (block swap brings the block's weights back for it through them)."""

    def __init__(self):
        self._blocks: list[nn.Module] = []

    def attach(self, networks: Mapping[str, nn.Module]) -> list[str]:
        from torch.utils.checkpoint import checkpoint
        for dit in networks.values():
            for name in ("blocks", "vace_blocks"):
                for block in getattr(dit, name, ()):
                    original = block.forward

                    def run(*args, _forward=original, _block=block, **kwargs):
                        if not torch.is_grad_enabled():
                            return _forward(*args, **kwargs)
                        calls = [0]

                        def compute(*a, **k):
                            calls[0] += 1  # the first call is the forward, inside the block's own hooks
                            return _forward(*a, **k) if calls[0] == 1 else _with_hooks(_block, _forward, a, k)
                        return checkpoint(compute, *args, use_reentrant=False, **kwargs)
                    block.forward = run
                    self._blocks.append(block)
        return [f"gradient checkpointing: {len(self._blocks)} blocks recomputed in the backward pass"]

    def detach(self, networks: Mapping[str, nn.Module]) -> None:
        for block in self._blocks:
            block.__dict__.pop("forward", None)
        self._blocks.clear()


def _with_hooks(block: nn.Module, forward, args: tuple, kwargs: dict):
    """``forward(*args, **kwargs)`` between the block's forward pre- and post-hooks, as ``block(...)``
    would run it: the recomputation calls the forward itself, outside ``__call__``. The post-hooks also
    run when the recomputation stops early (torch stops it, with an exception of its own, once it has
    what the backward needs); they are then given no output."""
    for hook in block._forward_pre_hooks.values():
        hook(block, args)
    out = None
    try:
        out = forward(*args, **kwargs)
        return out
    finally:
        for hook in block._forward_hooks.values():
            hook(block, args, out)


def offload_activations(enabled: bool, device: torch.device):
    """``--gradient_checkpointing_cpu_offload``: the tensors saved for the backward pass go to CPU memory."""
    import contextlib
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
