"""Part 4: the project's 8-bit weights against bf16 at 1.3B shape, 480p 81 frames (32,760 tokens).

Modes (:mod:`wan.layers.quant`): plain fp8, block-scaled fp8 and row-wise int8, each dequantising
its weight to bf16 for an ordinary matmul; and the two fp8 modes with ``scaled_mm=True``, where the
project's :func:`~wan.layers.quant.select_matmul` may choose ``torch._scaled_mm`` (tensor-wise for
plain fp8 on sm89+, row-wise for fp8_scaled on sm90+, which then stores one scale per row).

Per mode, a copy of one random bf16 DiT is quantised with :func:`wan.optim.quant.quantize_` as the
engine does (``keep=WanDiT.keep_in_fp32``): its weight bytes (``module_bytes``), the matmul path
every quantised layer takes, one forward's time and peak memory, and the output's difference from
the bf16 model's. Then one FFN linear alone (L x 1536 @ 1536 x 8960) per mode: time and TFLOP/s.
"""

from __future__ import annotations

import copy
import time
from collections import Counter

import torch
from torch import nn

from gpu_parts.common import (Ctx, Peak, case_error, dit_flops, dit_inputs, free_memory, gib, measured, ms, random_dit,
                              rel_diff, tflops, timed, tokens_of)

# (label, quantize_ mode or None for the bf16 model, scaled_mm)
MODES = (
    ("bf16", None, False),
    ("fp8", "fp8", False),
    ("fp8 + scaled_mm", "fp8", True),
    ("fp8_scaled", "fp8_scaled", False),
    ("fp8_scaled + scaled_mm", "fp8_scaled", True),
    ("int8", "int8", False),
)
COLUMNS = ["case", "matmul path", "weights", "time", "vs bf16", "TFLOP/s", "rel diff vs bf16", "activation peak"]
HOPPER = (9, 0)


def matmul_paths(model: nn.Module, device: torch.device) -> str:
    """How many quantised layers take each matmul path on ``device`` (``QuantLinear.matmul_path``)."""
    from wan.layers.quant import QuantLinear
    probe = torch.empty(0, device=device)   # matmul_path reads only the input's device
    counts = Counter(m.matmul_path(probe) for m in model.modules() if isinstance(m, QuantLinear))
    return ", ".join(f"{path} x{n}" for path, n in counts.most_common()) or "bf16 matmul"


def hopper_path(layer: nn.Module) -> str:
    """The path :func:`select_matmul` would give ``layer`` on an sm90 GPU (the dry run shows it)."""
    from wan.layers.quant import QuantLinear, select_matmul
    if not isinstance(layer, QuantLinear):
        return "bf16 matmul"
    return select_matmul(enabled=layer.scaled_mm, device_type="cuda", capability=HOPPER, weight_dtype=layer.qweight.dtype,
                         scale_kind=layer.scale_kind, in_features=layer.in_features, out_features=layer.out_features,
                         compute_dtype=layer.compute_dtype)


def quantized_copy(base: nn.Module, mode: str | None, scaled_mm: bool) -> nn.Module:
    from wan.models.dit import WanDiT
    from wan.optim.quant import quantize_
    if mode is None:
        return base
    model = copy.deepcopy(base)
    quantize_(model, mode, keep=WanDiT.keep_in_fp32, scaled_mm=scaled_mm)
    return model


def forward_case(ctx: Ctx, model: nn.Module, inputs) -> tuple[torch.Tensor, float, Peak]:
    """(output of the warm-up forward, median seconds of 3 more, memory peaks)."""
    with Peak(ctx.device) as peak:
        out = model(*inputs)
        seconds = timed(lambda: model(*inputs), ctx.device, runs=1 if ctx.dry else 3, warmup=0)
    return out, seconds, peak


def linear_case(ctx: Ctx, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(output, median seconds of 10 calls after 3 warm-ups)."""
    y = layer(x)
    return y, timed(lambda: layer(x), ctx.device, runs=3 if ctx.dry else 10, warmup=1 if ctx.dry else 3)


def versus(ref_seconds: float | None, seconds: float) -> str:
    return f"{ref_seconds / seconds:.2f}x" if ref_seconds else "–"


def diff_cell(mode: str | None, diff: float | None) -> str:
    return "0 (reference)" if mode is None else ("–" if diff is None else f"{diff:.2e}")


def dit_rows(ctx: Ctx, shape: dict, latent, deadline: float) -> tuple[list[list], dict]:
    """One row per mode: the whole 1.3B-shape DiT, quantised as the engine does."""
    from wan.optim.quant import module_bytes
    tokens = tokens_of(latent)
    flops = dit_flops(shape, tokens)
    base = random_dit(shape, ctx.device, seed=ctx.seed)
    inputs = dit_inputs(ctx, shape, latent)
    rows, data = [], {}
    ref_out, ref_seconds = None, None
    for label, mode, scaled_mm in MODES:
        name = f"1.3B DiT, {label}"
        if ref_seconds is not None and deadline - time.perf_counter() < 5 * ref_seconds + 5:
            rows.append([name, "skipped: the part's time limit is near"] + ["–"] * 6)
            continue
        try:
            model = quantized_copy(base, mode, scaled_mm)
            paths, weights = matmul_paths(model, ctx.device), module_bytes(model)
            out, seconds, peak = forward_case(ctx, model, inputs)
            model = None   # a quantised copy is freed here; the bf16 base stays for the next copies
            if mode is None:
                ref_out, ref_seconds = out, seconds
            diff = rel_diff(out, ref_out) if ref_out is not None else None
            data[label] = {"path": paths, "weight_bytes": weights, "seconds": seconds, "rel_diff": diff,
                           "peak_allocated": peak.allocated, "peak_growth": peak.growth}
            rows.append([name, paths, gib(weights), ms(seconds), versus(ref_seconds, seconds), tflops(flops, seconds),
                         diff_cell(mode, diff), gib(peak.growth)])
            out = None
        except Exception as e:
            model = out = None
            data[label] = {"error": case_error(e)}
            rows.append([name, case_error(e)] + ["–"] * 6)
        free_memory()
    return rows, data


def linear_rows(ctx: Ctx, shape: dict, tokens: int) -> tuple[list[list], dict, dict]:
    """One row per mode: one FFN-shaped linear layer alone; also the path sm90 would take."""
    from wan.layers.quant import QuantLinear
    from wan.optim.quant import module_bytes
    d_in, d_out = shape["dim"], shape["ffn_dim"]
    g = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 5)
    linear = nn.Linear(d_in, d_out, device=ctx.device, dtype=torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02, generator=g)
        linear.bias.normal_(0.0, 0.02, generator=g)
    x = torch.randn(tokens, d_in, generator=g, device=ctx.device).to(torch.bfloat16)
    flops = 2.0 * tokens * d_in * d_out
    rows, data, hopper = [], {}, {}
    ref_y, ref_seconds = None, None
    for label, mode, scaled_mm in MODES:
        name = f"linear {tokens}x{d_in} @ {d_in}x{d_out}, {label}"
        try:
            layer = linear if mode is None else QuantLinear.from_linear(linear, mode, scaled_mm=scaled_mm)
            path = layer.matmul_path(x) if isinstance(layer, QuantLinear) else "bf16 matmul"
            hopper[label] = hopper_path(layer)
            y, seconds = linear_case(ctx, layer, x)
            if mode is None:
                ref_y, ref_seconds = y, seconds
            diff = rel_diff(y, ref_y) if ref_y is not None else None
            data[label] = {"path": path, "weight_bytes": module_bytes(layer), "seconds": seconds,
                           "tflops": flops / seconds / 1e12, "rel_diff": diff, "sm90_path": hopper[label]}
            rows.append([name, path, gib(module_bytes(layer)), ms(seconds), versus(ref_seconds, seconds),
                         tflops(flops, seconds), diff_cell(mode, diff), "–"])
        except Exception as e:
            data[label] = {"error": case_error(e)}
            rows.append([name, case_error(e)] + ["–"] * 6)
        layer = y = None
        free_memory()
    return rows, data, hopper


def run(ctx: Ctx) -> dict:
    deadline = time.perf_counter() + ctx.time_left(0.75)
    shape = ctx.dit_shape("1.3b")
    latent = ctx.latent_video(480, 832, 81)
    tokens = tokens_of(latent)
    with torch.inference_mode():
        rows, dit_data = dit_rows(ctx, shape, latent, deadline)
        free_memory()
        linear, linear_data, hopper = linear_rows(ctx, shape, tokens)
        free_memory()
    rows += linear
    data = {"tokens": tokens, "dit": dit_data, "linear": linear_data}
    d_in, d_out = shape["dim"], shape["ffn_dim"]
    lin_flops = 2.0 * tokens * d_in * d_out

    latent_text = "x".join(map(str, latent))
    notes = [f"DiT: latent {latent_text} ({tokens} tokens), 24 text tokens, random bf16 weights (std 0.02) with "
             "the reference's float32 modules; each mode quantises a copy of the same model with quantize_(..., "
             "keep=WanDiT.keep_in_fp32) as the engine does; one warm-up forward (compared with bf16's) then the "
             "median of 3. 'weights' is module_bytes of the whole model; TFLOP/s counts the reference's 512 text "
             "rows; 'vs bf16' is bf16's time over the mode's (above 1: faster); 'activation peak' is the peak "
             "allocated above the weights (the bf16 model the copies are made from stays resident).",
             "matmul path: QuantLinear.matmul_path of every quantised layer (dequant: the weight is cast to bf16 "
             "for an ordinary matmul on every call; scaled_mm_*: torch._scaled_mm with the activations quantised to "
             "fp8 on the fly). The engine never passes scaled_mm=True today: those rows are the opt-in path.",
             f"linear: x [{tokens}, {d_in}] bf16 through one FFN-shaped layer with bias, median of 10 after 3 "
             f"warm-ups; {lin_flops / 1e12:.2f} TFLOP per call."]
    if ctx.dry:
        notes.append("Dry run: one timed forward and 3 linear calls (not 3 and 10). The CPU, where every mode "
                     "dequantises; on an sm90 GPU select_matmul would give the linear: "
                     + ", ".join(f"{k} -> {v}" for k, v in hopper.items()) + ".")
    return measured(COLUMNS, rows, notes=notes, data=data)
