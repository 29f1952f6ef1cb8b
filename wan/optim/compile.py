"""``torch.compile`` of a network's repeated blocks only (its ``_repeated_blocks`` trait).

Compiling the repeated block keeps compile time to one graph reused by every layer, and leaves the
rest of the model (embeddings, head, the sampling loop) eager. The first forward pays the compile
time; shapes that change (another resolution or frame count) recompile once each.
"""

from __future__ import annotations

import torch.nn as nn


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
