"""Gradient checkpointing (``--gradient_checkpointing``), attached to the DiTs from outside."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


class GradientCheckpointing:
    """Recomputes each DiT block in the backward pass (``torch.utils.checkpoint``), put on from outside
    the network by replacing each block's ``forward`` on the instance; detach restores it. Random draws
    inside a block (LoRA dropout) are replayed identically in the recomputation, and so are the block's
    own forward hooks (block swap brings the block's weights back for it through them).

    The reentrant form is used: the forward pass runs the blocks without recording a graph, and each
    block's graph is built only when it is recomputed in the backward pass. Recording the graph in the
    forward pass (the non-reentrant form) allocates autograd's small objects all through it, which
    live until the backward; on the CPU they land between the freed activations and the heap grew by
    about a block's activations per block (0.7 GB for a 1.3B DiT on 512 tokens, against 0.1 GB
    unrecorded: ``benchmarks/bench_train_step.py``). The reentrant form needs an input that requires
    grad: when none does (the first block's), the tokens enter as a fresh leaf, whose gradient is not
    used. Tensors that require grad inside other arguments (a LoRA on the text embedding, say) would
    get no gradient there, so such a call takes the non-reentrant form.
    """

    def __init__(self):
        self._blocks: list[nn.Module] = []

    def attach(self, networks: Mapping[str, nn.Module]) -> list[str]:
        for dit in networks.values():
            for name in ("blocks", "vace_blocks"):
                for block in getattr(dit, name, ()):
                    block.forward = _checkpointed(block, block.forward)
                    self._blocks.append(block)
        return [f"gradient checkpointing: {len(self._blocks)} blocks recomputed in the backward pass"]

    def detach(self, networks: Mapping[str, nn.Module]) -> None:
        for block in self._blocks:
            block.__dict__.pop("forward", None)
        self._blocks.clear()


def _checkpointed(block: nn.Module, forward):
    """``forward`` of ``block`` run through ``torch.utils.checkpoint`` when gradients are recorded."""
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        calls = [0]

        def compute(*a):
            calls[0] += 1  # the first call is the forward, inside the block's own hooks
            return forward(*a, **kwargs) if calls[0] == 1 else _with_hooks(block, forward, a, kwargs)
        if _grad_beyond_tensor_args(args, kwargs):
            return checkpoint(compute, *args, use_reentrant=False)
        return checkpoint(compute, *_with_a_grad_input(args), use_reentrant=True)
    return run


def _requires_grad(value, depth: int = 0) -> bool:
    """A tensor that requires grad in ``value`` (looked for inside tuples, lists, dicts and dataclasses)."""
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if depth > 3:
        return False
    if isinstance(value, (tuple, list)):
        return any(_requires_grad(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_requires_grad(v, depth + 1) for v in value.values())
    if hasattr(value, "__dataclass_fields__"):
        return any(_requires_grad(getattr(value, f), depth + 1) for f in value.__dataclass_fields__)
    return False


def _grad_beyond_tensor_args(args: tuple, kwargs: dict) -> bool:
    """Whether a tensor requiring grad sits where the reentrant form does not track it: in a keyword
    argument, or inside a non-tensor argument."""
    return (any(_requires_grad(v) for v in kwargs.values())
            or any(not isinstance(a, torch.Tensor) and _requires_grad(a) for a in args))


def _with_a_grad_input(args: tuple) -> tuple:
    """``args`` with the first tensor made a leaf that requires grad when no tensor argument does (the
    reentrant form returns outputs without grad otherwise, and the block's LoRA would learn nothing)."""
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return args
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return (*args[:i], a.detach().requires_grad_(), *args[i + 1:])
    return args


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
