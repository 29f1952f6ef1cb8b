"""FSDP2 for inference: the DiT's blocks and the umT5 encoder's blocks sharded over all ranks.

``--dit_fsdp`` / ``--t5_fsdp`` as the official Wan scripts, with PyTorch's FSDP2
(``fully_shard``), which also runs on the CPU (gloo), unlike FSDP1. Each rank keeps ``1/n`` of
every sharded parameter; a block's parameters are all-gathered just before it runs and freed after
(``reshard_after_forward``), so the peak is the resident part plus about two blocks.

FSDP2 gathers one dtype per group ("FSDP expects uniform original parameter dtype"), while Wan
keeps norms, modulation and the head in float32 beside bf16 linear layers. :func:`shard_module`
therefore makes one group of the module itself (its own parameters' dtype, with the submodules
of that dtype) and one list-group per other dtype (``fully_shard([...])``, gathered when the first
of them runs): a bf16 DiT block is two all-gathers, its bf16 linears and its float32 rest.

Order: shard after loading (and after quantising or merging LoRAs), before attaching the job's
parts. Anything reading weights outside a forward (TeaCache's time-embedding schedule calls
``dit._time_embedding`` directly) must run before sharding, or between ``unshard()`` and
``reshard()``. Block streaming (``wan.optim.offload``) and FSDP both own the parameters: use one.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn as nn


# Submodules of a VACE block that WanDiT calls outside the block's forward (before_proj on the
# control tokens before the first block, after_proj on each block's output): a unit of the whole
# block would not have gathered them when they run, so each is a unit of its own.
OUTSIDE_FORWARD = ("before_proj", "after_proj")


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    return FSDPModule, MixedPrecisionPolicy, fully_shard


def _own_params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


def _unsharded_leaves(module: nn.Module, FSDPModule) -> Iterable[nn.Module]:
    """Submodules holding parameters of their own, below ``module`` and not inside an already
    sharded submodule."""
    stack = list(module.children())
    while stack:
        m = stack.pop()
        if isinstance(m, FSDPModule):
            continue
        if _own_params(m):
            yield m
        stack.extend(m.children())


def shard_module(module: nn.Module, mesh, *, mp_policy=None, reshard_after_forward: bool = True) -> int:
    """``fully_shard`` of ``module`` (one group per parameter dtype; see the module docstring).
    Returns the number of FSDP groups made."""
    FSDPModule, _, fully_shard = _fsdp()
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    leaves = list(_unsharded_leaves(module, FSDPModule))
    by_dtype: dict[torch.dtype, list[nn.Module]] = {}
    for leaf in leaves:
        dtypes = {p.dtype for p in _own_params(leaf)}
        if len(dtypes) > 1:
            raise ValueError(f"FSDP: {type(leaf).__name__} holds parameters of several dtypes "
                             f"{sorted(map(str, dtypes))}; FSDP2 gathers one dtype per group")
        by_dtype.setdefault(dtypes.pop(), []).append(leaf)
    own = {p.dtype for p in _own_params(module)}
    if len(own) > 1:
        raise ValueError(f"FSDP: {type(module).__name__} holds parameters of several dtypes itself")
    if own:
        main = own.pop()
    else:  # the dtype holding the most elements stays with the module
        sizes = Counter({dt: sum(p.numel() for m in mods for p in _own_params(m)) for dt, mods in by_dtype.items()})
        main = sizes.most_common(1)[0][0] if sizes else None
    groups = 0
    for dtype, mods in by_dtype.items():
        if dtype != main:
            fully_shard(mods, **kwargs)
            groups += 1
    fully_shard(module, **kwargs)
    return groups + 1


def _mp_policy(param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None):
    if param_dtype is None and reduce_dtype is None:
        return None
    _, MixedPrecisionPolicy, _ = _fsdp()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def shard_dit(dit: nn.Module, mesh, *, param_dtype: torch.dtype | None = None,
              reduce_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """``--dit_fsdp``: each main and VACE block sharded as its own unit over ``mesh`` (a 1-D mesh of
    every rank: ``ParallelState.fsdp_mesh``), then the rest (embeddings, head) as the root unit.
    ``param_dtype`` None computes in the weights' own dtypes, as an unsharded DiT does (the loader
    already keeps the float32 islands). Returns ``dit``, changed in place."""
    policy = _mp_policy(param_dtype, reduce_dtype)
    for name in ("blocks", "vace_blocks"):
        for block in getattr(dit, name, ()):
            for outside in OUTSIDE_FORWARD:  # their own unit: gathered when they are called
                if hasattr(block, outside):
                    shard_module(getattr(block, outside), mesh, mp_policy=policy,
                                 reshard_after_forward=reshard_after_forward)
            shard_module(block, mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    shard_module(dit, mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return dit


def text_encoder_blocks(te: nn.Module) -> nn.ModuleList:
    """The umT5 encoder's repeated blocks (``UMT5TextEncoder.model.encoder.block``)."""
    blocks = getattr(getattr(getattr(te, "model", None), "encoder", None), "block", None)
    if blocks is None:
        raise ValueError(f"FSDP: {type(te).__name__} has no encoder blocks at .model.encoder.block")
    return blocks


def shard_text_encoder(te: nn.Module, mesh, *, param_dtype: torch.dtype | None = None,
                       reshard_after_forward: bool = True) -> nn.Module:
    """``--t5_fsdp``: each umT5 block sharded as its own unit, then the embedding and final norm as
    the root unit (the tied ``shared`` / ``embed_tokens`` weight stays one parameter)."""
    policy = _mp_policy(param_dtype, None)
    for block in text_encoder_blocks(te):
        shard_module(block, mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    shard_module(te, mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return te


def is_sharded(module: nn.Module) -> bool:
    FSDPModule, _, _ = _fsdp()
    return isinstance(module, FSDPModule)


@contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module]:
    """The parameters of ``module``'s own FSDP unit whole for the ``with`` block, for code that
    reads weights outside a forward (``wan.optim.step_cache.time_embeddings`` reads the root
    unit's time embedding). A collective: every rank enters it. No-op on an unsharded module."""
    if not is_sharded(module):
        yield module
        return
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()
