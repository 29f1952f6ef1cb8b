"""The quantised linear layer and the quantisation of one weight.

These layer types sit below both loading (which builds :class:`QuantLinear` layers straight from
a pre-quantised file) and optim (whose :func:`wan.optim.quant.quantize_` swaps them into a built
model), as ComfyUI keeps its ``ops``. A :class:`QuantLinear` stores the weight in 8 bits and
computes in a float dtype:

==============  ===========================================================================================
mode            storage, per weight [out, in]
==============  ===========================================================================================
``none``        nothing changes
``fp8``         float8 e4m3fn, a plain cast of the weight clamped to +-448 (e4m3's largest finite value;
                beyond it the cast gives NaN). 3 mantissa bits: about 6% relative error per weight.
``fp8_scaled``  float8 e4m3fn of the weight divided by a scale per (output row, block of ``block_size``
                inputs): scale = block amax / 448 (at least 1e-8), as musubi-tuner's ``--fp8_scaled``.
                Small blocks use the whole e4m3 range, so one outlier only coarsens its own block.
                Scales are float32 (musubi keeps them in the model dtype; float32 costs 4/64 byte per
                weight and avoids a second rounding). One scale per row when ``in`` is not a multiple
                of ``block_size``.
``int8``        int8 of round(weight / scale), scale = row amax / 127 per output row (symmetric).
==============  ===========================================================================================

Every mode dequantises the weight to the compute dtype (bf16/fp16/fp32) and runs an ordinary
matmul: memory is saved, arithmetic is the float one. Optionally (``scaled_mm=True``) fp8 layers use
``torch._scaled_mm`` on CUDA GPUs of compute capability 8.9 or more when the layer allows it (see
:func:`select_matmul`); that path also quantises the activations to fp8, so it trades accuracy for
speed and is never chosen silently.

The int8 mode is our own (a dozen lines) rather than optimum-quanto or torchao: neither is a
dependency of the project, both put tensor subclasses in the model that our streaming and
``materialize`` would have to learn, and weight-only int8 needs nothing they add.

The networks read ``layer.weight.dtype`` to find their compute dtype (``wan.models.dit``) and
transformers' T5 feed-forward reads ``wo.weight`` too; :class:`QuantLinear` keeps that working with
a ``weight`` property that returns the dequantised weight (correct, but it dequantises: hot paths
should read ``compute_dtype`` through :func:`compute_dtype_of` instead).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MODES = ("none", "fp8", "fp8_scaled", "int8")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0            # largest finite e4m3fn value
INT8_MAX = 127.0           # symmetric: -128 is never used
_SCALE_FLOOR = 1e-8        # musubi's floor: an all-zero block gets a tiny scale, not a division by 0
_SCALED_MM_MIN_CAPABILITY = (8, 9)   # Ada / Hopper: fp8 tensor cores
_ROWWISE_MIN_CAPABILITY = (9, 0)     # row-wise scales in _scaled_mm need Hopper kernels


# ---------------------------------------------------------------------------------------------
# Quantising one weight (float32 maths whatever the input dtype)


def quantize_fp8(weight: torch.Tensor) -> torch.Tensor:
    """Plain cast: [out, in] float -> [out, in] e4m3fn, clamped to the finite range."""
    return weight.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_fp8_blockwise(weight: torch.Tensor, block_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled fp8 as musubi-tuner's fp8_scaled.

    Args:
        weight: [out, in] float.
        block_size: inputs per block; None, or a size that does not divide ``in``: one block per row.
    Returns:
        qweight [out, in] e4m3fn and scale float32 ([out, in // block, 1], or [out, 1] per row) with
        ``weight ~= qweight.view(out, -1, block) * scale``.
    """
    out_f, in_f = weight.shape
    block = block_size if block_size and in_f % block_size == 0 else in_f
    blocks = weight.float().view(out_f, in_f // block, block)
    scale = blocks.abs().amax(dim=-1, keepdim=True).div(FP8_MAX).clamp_min(_SCALE_FLOOR)
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(out_f, in_f)
    return q, (scale.view(out_f, 1) if block == in_f else scale)


def quantize_int8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> int8 [out, in] and float32 scale [out, 1], weight ~= q * scale."""
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).div(INT8_MAX).clamp_min(_SCALE_FLOOR)
    return (w / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_weight(weight: torch.Tensor, mode: str, *, block_size: int | None = 64,
                    scaled_mm: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(qweight, scale or None) of an [out, in] float weight in ``mode`` (fp8, fp8_scaled, int8),
    as :meth:`QuantLinear.from_linear` stores them."""
    if mode == "fp8":
        return quantize_fp8(weight), None
    if mode == "fp8_scaled":
        # the _scaled_mm kernels take one scale per row at most: ask for rows when they may run
        return quantize_fp8_blockwise(weight, None if scaled_mm else block_size)
    if mode == "int8":
        return quantize_int8_rowwise(weight)
    raise ValueError(f"QuantLinear: mode '{mode}' is not one of {', '.join(QUANT_MODES[1:])}")


# ---------------------------------------------------------------------------------------------
# Choosing the matmul


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def select_matmul(*, enabled: bool, device_type: str, capability: tuple[int, int] | None,
                  weight_dtype: torch.dtype, scale_kind: str, in_features: int, out_features: int,
                  compute_dtype: torch.dtype) -> str:
    """Which matmul a quantised layer runs: ``"dequant"``, ``"scaled_mm_tensorwise"`` or
    ``"scaled_mm_rowwise"``. A pure function of its arguments, so it is testable without a GPU.

    ``torch._scaled_mm`` multiplies two e4m3 matrices with one scale per tensor (CUDA capability
    >= 8.9) or one per row of each side (>= 9.0, bf16 output only); the CUDA kernels need both
    ``in`` and ``out`` to be multiples of 16. Block scales (musubi's default) have no such recipe,
    so those layers always dequantise.
    """
    if not enabled or weight_dtype != FP8 or device_type != "cuda" or capability is None:
        return "dequant"
    if capability < _SCALED_MM_MIN_CAPABILITY or in_features % 16 or out_features % 16:
        return "dequant"
    if scale_kind in ("none", "tensor"):
        return "scaled_mm_tensorwise"
    if scale_kind == "row" and capability >= _ROWWISE_MIN_CAPABILITY and compute_dtype == torch.bfloat16:
        return "scaled_mm_rowwise"
    return "dequant"


def scaled_mm_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor | None,
                     bias: torch.Tensor | None, out_dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    """``x @ (qweight * scale).T + bias`` through ``torch._scaled_mm``; activations are quantised
    to e4m3 on the fly (one scale per row of x when ``rowwise``, else one for the whole x).

    Args:
        x: [..., in] float.  qweight: [out, in] e4m3fn.  weight_scale: one value or [out, 1].
    Returns:
        [..., out] in ``out_dtype``.
    """
    lead, out_f = x.shape[:-1], qweight.shape[0]
    a = x.reshape(-1, x.shape[-1]).float()
    a_amax = a.abs().amax(dim=1, keepdim=True) if rowwise else a.abs().amax()
    a_scale = (a_amax / FP8_MAX).clamp_min(1e-12)
    a_q = (a / a_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    w_scale = torch.ones((), device=x.device) if weight_scale is None else weight_scale.float()
    w_scale = w_scale.reshape(1, -1).expand(1, out_f).contiguous() if rowwise else w_scale.reshape(())
    # qweight [out, in] row-major: its transpose is the column-major right operand the kernel wants
    y = torch._scaled_mm(a_q, qweight.t(), scale_a=a_scale, scale_b=w_scale, out_dtype=out_dtype)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y.reshape(*lead, out_f)


# ---------------------------------------------------------------------------------------------
# The quantised layer


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored in 8 bits (see the module docstring for the modes).

    State dict: ``qweight`` [out, in] (e4m3fn/e5m2 or int8), ``weight_scale`` (float32; absent for
    plain fp8), ``bias`` [out] (kept in the original dtype). ``compute_dtype`` is a plain attribute:
    the dtype inputs are cast to and outputs come in, as an ``nn.Linear`` of that dtype would.
    """

    def __init__(self, in_features: int, out_features: int, mode: str, qweight: torch.Tensor,
                 weight_scale: torch.Tensor | None, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype, scaled_mm: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.compute_dtype = compute_dtype
        self.scaled_mm = scaled_mm
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, *, block_size: int | None = 64,
                    compute_dtype: torch.dtype | None = None, scaled_mm: bool = False) -> QuantLinear:
        """Quantises one ``nn.Linear`` (mode fp8, fp8_scaled or int8); the linear is not modified."""
        w = linear.weight.detach()
        q, scale = quantize_weight(w, mode, block_size=block_size, scaled_mm=scaled_mm)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(linear.in_features, linear.out_features, mode, q, scale, bias,
                   compute_dtype or w.dtype, scaled_mm)

    # -- reading the weight ---------------------------------------------------------------------

    @property
    def scale_kind(self) -> str:
        """``none`` (plain fp8), ``tensor`` (one scale), ``row`` (one per output row) or ``block``."""
        s = self.weight_scale
        if s is None:
            return "none"
        if s.numel() == 1:
            return "tensor"
        return "row" if s.numel() == self.out_features else "block"

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as floats, [out, in] in ``dtype`` (default: the compute dtype).

        In float32 this is exactly ``qweight.float() * scale`` (what the loader computes when it
        dequantises a ComfyUI file); in bf16/fp16 the product is taken in that dtype, which spares
        a float32 copy of the weight (fp8 and int8 values are exact in bf16 and fp16).
        """
        dtype = dtype or self.compute_dtype
        w = self.qweight.to(dtype)
        if self.weight_scale is None:
            return w
        s = self.weight_scale.to(dtype)
        rows = 1 if s.numel() == 1 else self.out_features
        grid = s.reshape(rows, -1, 1)   # [1 | out, blocks, 1]
        return (w.view(self.out_features, grid.shape[1], -1) * grid).view(self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight in the compute dtype: a fresh tensor on every access, so code that
        checks ``layer.weight.dtype`` sees the compute dtype (never fp8, never int8)."""
        return self.dequantized_weight()

    # -- running --------------------------------------------------------------------------------

    def matmul_path(self, x: torch.Tensor) -> str:
        """The matmul :func:`select_matmul` picks for this layer and this input's device."""
        if not self.scaled_mm or x.device.type != "cuda":
            return "dequant"
        return select_matmul(enabled=True, device_type="cuda", capability=_cuda_capability(x.device.index or 0),
                             weight_dtype=self.qweight.dtype, scale_kind=self.scale_kind,
                             in_features=self.in_features, out_features=self.out_features,
                             compute_dtype=self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (any float dtype; cast to the compute dtype) -> [..., out] in the compute dtype."""
        cdt = self.compute_dtype
        x = x.to(cdt)
        path = self.matmul_path(x)
        if path != "dequant":
            return scaled_mm_linear(x, self.qweight, self.weight_scale, self.bias, cdt,
                                    rowwise=path == "scaled_mm_rowwise")
        bias = None if self.bias is None else self.bias.to(cdt)
        return F.linear(x, self.dequantized_weight(cdt), bias)

    def _apply(self, fn, recurse=True):
        """``Module.to``/``.half()``/``.cuda()`` pass through here. Device moves reach the stored
        weight like everything else, but a dtype cast meant for float weights (``model.to(bf16)``)
        must not turn the 8-bit storage back into floats: it changes the compute dtype instead."""
        stored = {n: b for n, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, old in stored.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)   # exact: the original, only moved
        try:
            probe = fn(torch.empty(0, dtype=self.compute_dtype))
        except RuntimeError:  # e.g. pin_memory without an accelerator: not a dtype cast either
            return self
        if probe.is_floating_point() and probe.dtype in COMPUTE_DTYPES:
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"storage={str(self.qweight.dtype).removeprefix('torch.')}, scales={self.scale_kind}, "
                f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}, bias={self.bias is not None}")


def compute_dtype_of(layer: nn.Module) -> torch.dtype:
    """The dtype a layer computes in: a quantised layer's ``compute_dtype``, else its weight's dtype.
    (Reading ``QuantLinear.weight`` would dequantise the whole weight just to learn a dtype.)"""
    cdt = getattr(layer, "compute_dtype", None)
    return cdt if cdt is not None else layer.weight.dtype
