"""Small fused kernels the networks use where the CPU build of torch offers them.

Each has a plain fallback computing the same function; the fused form is used only for dense
``nn.Linear`` layers on the CPU, so quantised layers and other devices take the plain path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def _fused_linear_gelu_available() -> bool:
    """oneDNN's matmul with a GELU(tanh) post-op, exposed by torch's CPU build (a private op)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.zeros(1, 8), torch.zeros(8, 8)
        torch.ops.mkldnn._linear_pointwise(x, w, None, "gelu", [], "tanh")
        return True
    except (AttributeError, RuntimeError):
        return False


def linear_gelu_tanh(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(linear(x))``; on the CPU one oneDNN call, which saves a pass over the (wide)
    FFN activation. Results equal the plain form up to rounding (the GELU runs inside the matmul's
    epilogue)."""
    # Under torch.compile the plain form is used: inductor fuses the GELU itself, and cannot lower
    # this private op. A layer with hooks (a LoRA, streaming) must run its own forward. The fused op
    # has no backward: when gradients are recorded (training), the plain form runs.
    recording = torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad)
    if (not recording and not torch.compiler.is_compiling() and type(linear) is nn.Linear and x.device.type == "cpu"
            and not linear._forward_hooks and not linear._forward_pre_hooks
            and x.dtype in (torch.float32, torch.bfloat16)
            and linear.weight.dtype == x.dtype and _fused_linear_gelu_available()):
        return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "gelu", [], "tanh")
    return F.gelu(linear(x), approximate="tanh")
