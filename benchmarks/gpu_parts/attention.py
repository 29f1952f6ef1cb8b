"""Part 3: every attention backend of the project at 1.3B shape, 480p 81 frames (32,760 tokens,
12 heads of 128), and torch's own SDPA kernels one by one.

Per backend of :mod:`wan.optim.attention`: whether it can run here (its own requirement check, then
:func:`select_attention` loading it), one self-attention call as the DiT makes it (q and k float32
out of RMSNorm/RoPE, v in bf16, all [1, L, heads, head_dim]; the backend casts q and k), its rate
and its largest difference from sdpa on the same inputs; then one whole 1.3B forward with the
backend installed by :func:`apply_attention`, against the sdpa forward.

Attention FLOPs: 4 * heads * L * L * head_dim (QK^T and PV). The inputs are standard normal.
"""

from __future__ import annotations

import time

import torch

from gpu_parts.common import (Ctx, case_error, dit_flops, dit_inputs, free_memory, measured, ms, random_dit, rel_diff,
                              sync, tflops, timed, tokens_of)

DTYPE = torch.bfloat16
# torch's SDPA kernels that run without any extra wheel; flash-attn and xformers wheels cannot be
# carried to the GPU machine, so these rows stand in for them.
SDPA_KERNELS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
CPU_SDPA_KERNELS = ("FLASH_ATTENTION",)   # torch has a CPU kernel of this one only (and MATH)
DRY_STAND_IN = "dry-run stand-in"
COLUMNS = ["backend", "available", "one call", "TFLOP/s", "max rel diff vs sdpa", "1.3B forward",
           "forward rel diff vs sdpa"]


def attention_inputs(ctx: Ctx, tokens: int, heads: int, head_dim: int):
    """q, k float32 and v bf16, each [1, tokens, heads, head_dim]: the layout and dtypes the DiT's
    self-attention passes (``wan.models.dit.SelfAttention``)."""
    g = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 3)
    shape = (1, tokens, heads, head_dim)
    q = torch.randn(shape, generator=g, device=ctx.device)
    k = torch.randn(shape, generator=g, device=ctx.device)
    v = torch.randn(shape, generator=g, device=ctx.device).to(DTYPE)
    return q, k, v


def attention_flops(tokens: int, heads: int, head_dim: int) -> float:
    return 4.0 * heads * tokens * tokens * head_dim


def time_call(fn, q, k, v, device) -> tuple[torch.Tensor, float, float]:
    """(output, first-call seconds, median seconds of 5 calls): the first call includes any JIT
    compile (sage's Triton kernels)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(q, k, v)
    sync(device)
    first = time.perf_counter() - t0
    seconds = timed(lambda: fn(q, k, v), device, runs=5, warmup=1)
    return out, first, seconds


def sdpa_kernel_fn(kernel: str):
    """The project's sdpa attention restricted to one of torch's SDPA kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from wan.models.attention import sdpa_attention
    backend = getattr(SDPBackend, kernel)

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return sdpa_attention(q, k, v)
    return fn


def run(ctx: Ctx) -> dict:
    from wan.optim.attention import Backend, register_backend, unregister_backend

    if not ctx.dry:
        return measure(ctx)
    # The dry run has no kernel but sdpa: a stand-in backend (torch's CPU flash kernel, registered
    # through the project's registry) takes the path every other backend takes on the GPU.
    register_backend(Backend(DRY_STAND_IN, lambda device, dtype: (True, "ok"), lambda: sdpa_kernel_fn("FLASH_ATTENTION"),
                             "dry run only: sdpa restricted to torch's flash kernel"))
    try:
        return measure(ctx)
    finally:
        unregister_backend(DRY_STAND_IN)


def measure(ctx: Ctx) -> dict:
    from wan.optim.attention import apply_attention, backend_names, check_backend, select_attention

    deadline = time.perf_counter() + ctx.time_left(0.75)
    shape = ctx.dit_shape("1.3b")
    latent = ctx.latent_video(480, 832, 81)
    tokens = tokens_of(latent)
    heads, head_dim = shape["num_heads"], shape["dim"] // shape["num_heads"]
    flops = attention_flops(tokens, heads, head_dim)
    rows: dict[str, list] = {}
    data: dict = {"tokens": tokens, "heads": heads, "head_dim": head_dim, "attention_flops": flops, "backends": {}}

    # -- one attention call per backend ---------------------------------------------------------
    q, k, v = attention_inputs(ctx, tokens, heads, head_dim)
    reference = None
    usable = []
    for name in backend_names():   # sdpa first: it is registered first, and it is the reference
        ok, reason = check_backend(name, ctx.device, DTYPE)
        info = data["backends"][name] = {"available": ok, "reason": reason}
        if not ok:
            rows[name] = [name, f"skipped: {reason}", "–", "–", "–", "–", "–"]
            continue
        try:
            selection = select_attention(name, ctx.device, DTYPE)
            if selection.name != name:   # passed its check but failed to load: select fell back
                raise RuntimeError(selection.reasons.get(name, f"select_attention chose {selection.name}"))
            out, first, seconds = time_call(selection.fn, q, k, v, ctx.device)
            if tuple(out.shape) != tuple(v.shape):
                raise RuntimeError(f"output shape {tuple(out.shape)}, expected {tuple(v.shape)}")
            if name == "sdpa":
                reference = out
            diff = rel_diff(out, reference) if reference is not None else None
            info.update(first_call_seconds=first, seconds=seconds, tflops=flops / seconds / 1e12, rel_diff=diff)
            rows[name] = [name, "yes", ms(seconds), tflops(flops, seconds),
                          "0 (reference)" if name == "sdpa" else ("–" if diff is None else f"{diff:.2e}"), "–", "–"]
            usable.append(name)
            del out
        except Exception as e:
            info["error"] = case_error(e)
            rows[name] = [name, case_error(e), "–", "–", "–", "–", "–"]
        free_memory()

    # -- torch's SDPA kernels, each alone ------------------------------------------------------
    for kernel in SDPA_KERNELS:
        label = f"torch sdpa [{kernel}]"
        info = data["backends"][label] = {}
        if not ctx.cuda and kernel not in CPU_SDPA_KERNELS:
            info.update(available=False, reason="a CUDA-only torch kernel")
            rows[label] = [label, "skipped: a CUDA-only torch kernel", "–", "–", "–", "–", "–"]
            continue
        try:
            out, first, seconds = time_call(sdpa_kernel_fn(kernel), q, k, v, ctx.device)
            diff = rel_diff(out, reference) if reference is not None else None
            info.update(available=True, first_call_seconds=first, seconds=seconds, tflops=flops / seconds / 1e12,
                        rel_diff=diff)
            rows[label] = [label, "yes", ms(seconds), tflops(flops, seconds),
                           "–" if diff is None else f"{diff:.2e}", "–", "–"]
            del out
        except Exception as e:
            info.update(available=False, error=case_error(e))
            rows[label] = [label, case_error(e), "–", "–", "–", "–", "–"]
        free_memory()
    del q, k, v, reference
    free_memory()

    # -- one whole 1.3B forward per usable backend ---------------------------------------------
    forward_notes = []
    if usable:
        model = random_dit(shape, ctx.device, seed=ctx.seed)
        inputs = dit_inputs(ctx, shape, latent)
        forward_flops = dit_flops(shape, tokens)
        data["forward_flops"] = forward_flops
        ref_out, ref_seconds = None, None
        with torch.inference_mode():
            for name in usable:   # sdpa first when it is usable (it always is)
                info = data["backends"][name]
                left = deadline - time.perf_counter()
                if ref_seconds is not None and left < 2.5 * ref_seconds + 5:
                    rows[name][5] = "skipped: the part's time limit is near"
                    continue
                try:
                    selection = apply_attention(model, name, ctx.device, DTYPE)
                    if selection.name != name:
                        raise RuntimeError(f"apply_attention installed {selection.name}")
                    out = model(*inputs)   # warm-up (and the output compared)
                    seconds = timed(lambda: model(*inputs), ctx.device, runs=1, warmup=0)
                    diff = None if ref_out is None else rel_diff(out, ref_out)
                    if name == "sdpa":
                        ref_out, ref_seconds = out, seconds
                    info.update(forward_seconds=seconds, forward_tflops=forward_flops / seconds / 1e12,
                                forward_rel_diff=diff)
                    rows[name][5] = f"{ms(seconds)} ({tflops(forward_flops, seconds)} TFLOP/s)"
                    rows[name][6] = "0 (reference)" if name == "sdpa" else ("–" if diff is None else f"{diff:.2e}")
                    del out
                except Exception as e:
                    info["forward_error"] = case_error(e)
                    rows[name][5] = case_error(e)
                free_memory()
        del model, ref_out
        free_memory()
        forward_notes.append(f"1.3B forward: one timed call after one warm-up, random weights (std 0.02), 24 text "
                             f"tokens; TFLOP/s counts the reference's 512 text rows ({forward_flops / 1e12:.0f} TFLOP). "
                             "The text cross-attention stays on SDPA (float32, with the folded-padding bias) "
                             "whatever backend is installed; only self-attention (and image attention) switch.")

    latent_text = "x".join(map(str, latent))
    notes = [f"latent {latent_text} ({tokens} tokens), {heads} heads x {head_dim}; one call: median of 5 after a "
             f"warm-up, q and k float32 and v bf16 as the DiT passes them (the backend's cast is timed too); "
             f"{flops / 1e12:.2f} TFLOP per call (4 * heads * L^2 * head_dim).",
             "Availability is the project's own check (wan.optim.attention.check_backend) and select_attention "
             "loading the kernel; 'max rel diff' is max |out - sdpa| / max |sdpa| on the same inputs.",
             "flash-attn and xformers wheels cannot be carried to the GPU machine (no flash-attn wheel for "
             "torch 2.11; xformers too large), so their rows say not installed; the 'torch sdpa [...]' rows time "
             "torch's own FlashAttention-2, memory-efficient and cuDNN kernels (sdpa_kernel) instead. "
             "Those rows have no whole forward: the text cross-attention needs a float32 kernel with a bias, "
             "which the flash and cuDNN kernels do not take."] + forward_notes
    if ctx.dry:
        notes.append(f"Dry run: the CPU; every CUDA kernel is skipped with the project's own reason. "
                     f"'{DRY_STAND_IN}' is registered for the dry run only (sdpa on torch's CPU flash kernel), "
                     "so the path a non-sdpa backend takes (select, time, compare, install, forward) runs too.")
    return measured(COLUMNS, list(rows.values()), notes=notes, data=data)
