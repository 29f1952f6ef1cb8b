"""Gradient checkpointing (``--gradient_checkpointing``), attached to the DiTs from outside."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


class GradientCheckpointing:
    """Recomputes each DiT block in the backward pass (``torch.utils.checkpoint``, non-reentrant), put
    on from outside the network by replacing each block's ``forward`` on the instance; detach restores it.
    Random draws inside a block (LoRA dropout) are replayed identically in the recomputation."""

    def __init__(self):
        self._blocks: list[nn.Module] = []

    def attach(self, networks: Mapping[str, nn.Module]) -> list[str]:
        from torch.utils.checkpoint import checkpoint
        for dit in networks.values():
            for name in ("blocks", "vace_blocks"):
                for block in getattr(dit, name, ()):
                    original = block.forward

                    def run(*args, _forward=original, **kwargs):
                        if not torch.is_grad_enabled():
                            return _forward(*args, **kwargs)
                        return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
                    block.forward = run
                    self._blocks.append(block)
        return [f"gradient checkpointing: {len(self._blocks)} blocks recomputed in the backward pass"]

    def detach(self, networks: Mapping[str, nn.Module]) -> None:
        for block in self._blocks:
            block.__dict__.pop("forward", None)
        self._blocks.clear()


def offload_activations(enabled: bool, device: torch.device):
    """``--gradient_checkpointing_cpu_offload``: the tensors saved for the backward pass go to CPU memory."""
    import contextlib
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
