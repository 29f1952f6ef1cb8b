"""Executing an offload plan with mmgp on CUDA (optional: mmgp is GPL-3.0 and CUDA-only).

The plan's numbers map onto ``mmgp.offload.all``'s arguments by a pure function,
:func:`mmgp_arguments`, testable anywhere. :func:`apply_mmgp` imports mmgp only when CUDA is
available and only inside the call, so the project neither needs nor loads mmgp otherwise; where
CUDA or mmgp is missing, ``wan.optim.offload.stream_blocks_`` executes the same plan.

mmgp's own meaning of the numbers (3.x): a model's budget is the megabytes of its weights that may
be on the GPU at once, 0 meaning no limit (the whole model moves at once); ``"*"`` is the default
for models not named. Pinned models are copied once into page-locked RAM for fast transfers.

Precision: by default mmgp casts every float32 parameter to bf16 when it takes a model
(``convertWeightsFloatTo``), which would run the DiT's float32 islands (norms, modulation, time
embedding, head) and the float32 VAE in bf16, unlike the project's own path and the reference.
:func:`keep_loaded_dtypes` marks them with mmgp's own switches, so every parameter keeps the dtype
it was loaded in.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Mapping

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MmgpSettings:
    """What a plan decides for mmgp, in plain values.

    Attributes:
        budgets_mb: model id (or "*") -> MB of its weights resident on the GPU at once; 0 = all.
        pinned: model ids whose weights go to pinned RAM (empty: none; ("*",): all).
        async_transfers: prefetch the next block on a second CUDA stream.
        compile: model ids whose repeated blocks are compiled with torch.compile.
        quantize: model ids mmgp quantises to int8 on load (the project prefers pre-quantised
            files, so usually empty).
        reserved_ram_fraction: cap on pinned RAM as a fraction of RAM (0: mmgp's default).
    """

    budgets_mb: Mapping[str, int] = field(default_factory=dict)
    pinned: tuple[str, ...] = ()
    async_transfers: bool = True
    compile: tuple[str, ...] = ()
    quantize: tuple[str, ...] = ()
    reserved_ram_fraction: float = 0.0

    def __post_init__(self):
        for name, mb in self.budgets_mb.items():
            if not isinstance(mb, int) or mb < 0:
                raise ValueError(f"mmgp budget for '{name}': {mb!r}, expected a whole number of MB >= 0 (0 = no limit)")
        if not 0.0 <= self.reserved_ram_fraction < 1.0:
            raise ValueError(f"reserved_ram_fraction={self.reserved_ram_fraction}: expected 0 <= value < 1")


def mmgp_arguments(settings: MmgpSettings, model_ids: list[str]) -> dict:
    """The keyword arguments of ``mmgp.offload.all`` for ``settings``, for models ``model_ids``."""
    unknown = sorted((set(settings.budgets_mb) | set(settings.pinned) | set(settings.compile)
                      | set(settings.quantize)) - set(model_ids) - {"*"})
    if unknown:
        raise ValueError(f"mmgp settings name models {', '.join(unknown)}; the pipeline has {', '.join(model_ids)}")
    pinned: bool | list[str]
    pinned = True if "*" in settings.pinned else (list(settings.pinned) or False)
    budgets = dict(settings.budgets_mb)
    return {
        "pinnedMemory": pinned,
        "budgets": budgets if budgets else 0,
        "asyncTransfers": settings.async_transfers,
        "compile": list(settings.compile) or False,
        # mmgp quantises "the transformer" with one flag and other models with another
        "quantizeTransformer": "transformer" in settings.quantize,
        "extraModelsToQuantize": [m for m in settings.quantize if m != "transformer"] or None,
        "perc_reserved_mem_max": settings.reserved_ram_fraction,
    }


def keep_loaded_dtypes(models: Mapping[str, torch.nn.Module]) -> int:
    """Tells mmgp to leave every parameter of ``models`` in the dtype it has; returns the modules
    locked.

    mmgp (3.x) reads two switches: a model's ``_convertWeightsFloatTo`` (None: no float32 parameter
    is cast) and a module's ``_lock_dtype`` (its own parameters are neither cast nor counted in the
    one dtype mmgp asserts a model has; inputs of a top-level module are cast to it). A float32
    model (the VAE) just keeps float32; in a model of another dtype, every module whose own floating
    parameters are all float32 (the DiT's norms, modulation, time embedding and head) is locked to
    float32. A module whose own parameters mix float32 with another dtype is left to mmgp, which
    casts its float32 ones to the model's dtype (it asserts one dtype per model otherwise).
    """
    locked = 0
    for model in models.values():
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if dtypes <= {torch.float32}:
            model._convertWeightsFloatTo = None
            continue
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
            if own and all(p.dtype == torch.float32 for p in own):
                module._lock_dtype = torch.float32
                locked += 1
    return locked


def apply_mmgp(models: Mapping[str, torch.nn.Module], settings: MmgpSettings, *, verbose: int = -1):
    """Hands ``models`` (model id -> module, e.g. {"transformer": dit, "text_encoder": te}) to mmgp.
    The default device torch creates tensors on is the same after the call as before it.

    Raises:
        RuntimeError: CUDA or mmgp is missing (use ``wan.optim.offload`` there).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("mmgp offload needs a CUDA GPU and none is available; "
                           "use wan.optim.offload.stream_blocks_ (block streaming) instead")
    try:
        from mmgp import offload  # imported here only: GPL-3.0, optional, CUDA-only
    except ImportError as e:
        raise RuntimeError(f"mmgp offload needs the optional package mmgp (pip install mmgp): {e}") from None
    kwargs = mmgp_arguments(settings, list(models))
    keep_loaded_dtypes(models)
    accepted = inspect.signature(offload.all).parameters
    dropped = sorted(k for k in kwargs if k not in accepted)
    if dropped:  # older mmgp releases lack some arguments; say which settings did not apply
        log.warning("mmgp %s does not take %s; those settings are not applied",
                    getattr(offload, "__version__", ""), ", ".join(dropped))
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    if "verboseLevel" in accepted:
        kwargs["verboseLevel"] = verbose
    previous = torch.get_default_device()
    try:
        return offload.all(dict(models), **kwargs)
    finally:  # mmgp ends with torch.set_default_device("cuda"): every later tensor would land there
        torch.set_default_device(None if previous == torch.device("cpu") else previous)
