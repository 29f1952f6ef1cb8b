"""Weight quantisation applied from outside the networks.

:func:`quantize_` walks a built model and swaps its ``nn.Linear`` layers, in place, for
:class:`~wan.layers.quant.QuantLinear` layers (the modes, their storage and matmuls are described
there). This module also recognises pre-quantised checkpoints (ComfyUI fp8 files) and builds
layers from their tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from wan.layers.quant import COMPUTE_DTYPES, QUANT_MODES, QuantLinear
from wan.loading.files import FP8_DTYPES, Checkpoint, open_checkpoint


# ---------------------------------------------------------------------------------------------
# Whole models


@dataclass
class QuantReport:
    """What :func:`quantize_` did. Bytes count parameters and buffers (scales included)."""

    mode: str
    quantized: int = 0                 # nn.Linear layers replaced
    kept: int = 0                      # nn.Linear layers left as they were by keep()
    bytes_before: int = 0              # whole module
    bytes_after: int = 0
    linear_bytes_before: int = 0       # the replaced layers only
    linear_bytes_after: int = 0
    kept_names: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Size reduction of the replaced layers (before / after); 1.0 when nothing was replaced."""
        return self.linear_bytes_before / self.linear_bytes_after if self.linear_bytes_after else 1.0

    def summary(self) -> str:
        gib = 1024 ** 3
        return (f"{self.mode}: {self.quantized} linear layers {self.linear_bytes_before / gib:.2f} GiB -> "
                f"{self.linear_bytes_after / gib:.2f} GiB ({self.ratio:.2f}x); model "
                f"{self.bytes_before / gib:.2f} -> {self.bytes_after / gib:.2f} GiB; "
                f"{self.kept} linear layers kept in high precision")


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each tensor counted once (tied weights too).
    Works on the meta device, so a plan can be sized before anything is read."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def check_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise ValueError(f"quantisation mode {mode!r} is not one of: {', '.join(QUANT_MODES)}")
    return mode


def keep_from_traits(module: nn.Module) -> Callable[[str], bool]:
    """The model's own list of layers that stay in high precision (``WanDiT.keep_in_fp32``), or
    keep nothing when the model declares none."""
    keep = getattr(module, "keep_in_fp32", None)
    return keep if callable(keep) else (lambda name: False)


def quantize_(module: nn.Module, mode: str, *, keep: Callable[[str], bool] = lambda name: False,
              block_size: int | None = 64, compute_dtype: torch.dtype | None = None,
              scaled_mm: bool = False) -> QuantReport:
    """Replaces, in place, every ``nn.Linear`` of ``module`` by a :class:`QuantLinear`.

    Args:
        module: a built model (any device, the meta device included); not itself an nn.Linear
            (use :meth:`QuantLinear.from_linear` for one layer).
        mode: one of :data:`QUANT_MODES`; ``"none"`` changes nothing.
        keep: qualified module names to leave untouched (``"blocks.0.ffn.0"``, ``"head.head"``);
            pass ``WanDiT.keep_in_fp32`` or :func:`keep_from_traits(model)`.
        block_size: fp8_scaled block along the input dimension (musubi: 64); None: one scale per row.
        compute_dtype: dtype the quantised layers compute in; None: each layer's original dtype.
        scaled_mm: allow the ``torch._scaled_mm`` path where the GPU and the layer allow it
            (fp8 modes; fp8_scaled then uses one scale per row instead of blocks).
    """
    check_mode(mode)
    if isinstance(module, nn.Linear):
        raise TypeError("quantize_ replaces layers inside a module; for a single nn.Linear use "
                        "QuantLinear.from_linear(layer, mode)")
    if block_size is not None and (not isinstance(block_size, int) or block_size <= 0):
        raise ValueError(f"quantize_: block_size must be a positive int or None, got {block_size!r}")
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"quantize_: compute_dtype {compute_dtype} is not one of "
                         f"{', '.join(str(d) for d in COMPUTE_DTYPES)}")
    report = QuantReport(mode=mode, bytes_before=module_bytes(module))
    targets = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            if keep(name):
                report.kept += 1
                report.kept_names.append(name)
            else:
                targets.append((name, child))
    if mode != "none":
        for name, linear in targets:
            q = QuantLinear.from_linear(linear, mode, block_size=block_size, compute_dtype=compute_dtype,
                                        scaled_mm=scaled_mm)
            report.linear_bytes_before += module_bytes(linear)
            report.linear_bytes_after += module_bytes(q)
            parent_name, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, leaf, q)
            report.quantized += 1
    report.bytes_after = module_bytes(module)
    return report


# ---------------------------------------------------------------------------------------------
# Pre-quantised checkpoints (ComfyUI fp8 files)


def prequantized_mode(source: Checkpoint | Mapping[str, torch.Tensor] | str | os.PathLike) -> str | None:
    """``"fp8_scaled"`` for a file with fp8 weights and ``<layer>.scale_weight`` tensors (ComfyUI
    scaled fp8, musubi), ``"fp8"`` for fp8 weights alone, None for a float checkpoint.

    ``source``: an open :class:`Checkpoint` (only its index is read), a state dict, or a path.
    """
    if isinstance(source, (str, os.PathLike)):
        source = open_checkpoint(source)
    if isinstance(source, Checkpoint):
        keys, dtype_of = source.keys(), source.dtype
    else:
        keys, dtype_of = list(source), (lambda k: source[k].dtype)
    # ComfyUI's newer scaled files also carry an empty fp8 marker tensor named "scaled_fp8"
    scaled = any(k.endswith(".scale_weight") or k.rsplit(".", 1)[-1] == "scaled_fp8" for k in keys)
    has_fp8 = any(dtype_of(k) in FP8_DTYPES for k in keys if not k.endswith("scaled_fp8"))
    if not has_fp8:
        return None
    return "fp8_scaled" if scaled else "fp8"


def is_prequantized(source: Checkpoint | Mapping[str, torch.Tensor] | str | os.PathLike) -> bool:
    """True when a checkpoint stores (some of) its weights in fp8 (see :func:`prequantized_mode`)."""
    return prequantized_mode(source) is not None


def load_quantized_linear_from(weight_fp8: torch.Tensor, scale_weight: torch.Tensor | None = None,
                               bias: torch.Tensor | None = None, *,
                               compute_dtype: torch.dtype = torch.bfloat16,
                               scaled_mm: bool = False) -> QuantLinear:
    """A :class:`QuantLinear` built straight from a pre-quantised file's tensors (no requantising).

    Args:
        weight_fp8: [out, in] float8 (e4m3fn or e5m2), used as is.
        scale_weight: None (plain fp8), one value (ComfyUI: shape [] or [1]), one per row ([out] or
            [out, 1]) or one per block ([out, blocks] or musubi's [out, blocks, 1]); kept in its
            shape, as float32 (exact for the float32/bf16/fp16 scales files carry).
        bias: [out] or None.
    """
    if weight_fp8.dtype not in FP8_DTYPES or weight_fp8.ndim != 2:
        raise ValueError(f"load_quantized_linear_from: weight must be a 2-D float8 tensor "
                         f"({', '.join(map(str, FP8_DTYPES))}), got {weight_fp8.dtype} {tuple(weight_fp8.shape)}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"load_quantized_linear_from: compute_dtype {compute_dtype} is not one of "
                         f"{', '.join(str(d) for d in COMPUTE_DTYPES)}")
    out_f, in_f = weight_fp8.shape
    if scale_weight is not None:
        n = scale_weight.numel()
        if not (n == 1 or (n % out_f == 0 and in_f % (n // out_f) == 0)):
            raise ValueError(f"load_quantized_linear_from: scale_weight of shape {tuple(scale_weight.shape)} "
                             f"fits neither one scale, one per row nor one per block of a weight "
                             f"{tuple(weight_fp8.shape)}")
        scale_weight = scale_weight.float()
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"load_quantized_linear_from: bias shape {tuple(bias.shape)}, expected ({out_f},)")
    mode = "fp8" if scale_weight is None else "fp8_scaled"
    return QuantLinear(in_f, out_f, mode, weight_fp8, scale_weight, bias, compute_dtype, scaled_mm)
