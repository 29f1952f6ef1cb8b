"""``torch.compile`` of a network's repeated blocks only (its ``_repeated_blocks`` trait).

Compiling the repeated block keeps compile time to one graph reused by every layer, and leaves the
rest of the model (embeddings, head, the sampling loop) eager. The first forward pays the compile
time; shapes that change (another resolution or frame count) recompile once each.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def compile_refusal(device: str | torch.device, dtype: torch.dtype) -> str | None:
    """Why compiling a DiT's blocks for ``device`` and ``dtype`` would give wrong outputs, or None.

    Inductor's C++ code for the CPU gave NaN in every output of a compiled Wan block in bfloat16
    (torch 2.13; its vectorised path: ``torch._inductor.config.cpp.simdlen = 1`` avoids it, slowly),
    while eager and float32 are right. So on the CPU only float32 blocks are compiled; CUDA
    (Triton code) is another path."""
    if torch.device(device).type == "cpu" and dtype != torch.float32:
        return (f"torch.compile left off: on the CPU its {str(dtype).removeprefix('torch.')} code gave NaN in the "
                f"DiT's blocks (torch {torch.__version__}); the CPU compiles float32 blocks only")
    return None


def compile_blocks_(model: nn.Module, **options) -> int:
    """Compiles, in place, every submodule whose class is one of ``model._repeated_blocks``.

    Returns:
        how many blocks were compiled.
    """
    names = getattr(model, "_repeated_blocks", ())
    if not names:
        raise ValueError(f"compile: {type(model).__name__} declares no _repeated_blocks to compile")
    count = 0
    for module in model.modules():
        if type(module).__name__ in names:
            module.compile(**options)
            count += 1
    return count
