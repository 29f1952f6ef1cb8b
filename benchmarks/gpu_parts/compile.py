"""Part 6: ``torch.compile`` of the repeated blocks (:func:`wan.optim.compile.compile_blocks_`, as
the engine calls it) on a 1.3B-shape DiT at 480p, 81 frames.

One random bf16 DiT runs eager, then its 30 blocks are compiled in place and it runs again:
the first compiled call's time (tracing, Inductor's code generation and Triton's kernel compile,
with caches on disk that start empty), the compiled step against the eager one, and the output
difference. Then Dynamo's in-memory cache is dropped and the blocks compiled again, so the first
call meets warm on-disk caches: what every later start of the app pays. The 30 blocks share one
compiled graph (one block class, one shape), which the graph count shows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from gpu_parts.common import (Ctx, Peak, case_error, dit_flops, dit_inputs, free_memory, gib, measured, ms, random_dit,
                              rel_diff, sync, tflops, timed, tokens_of)

# The dry run compiles with a backend that needs no C++ compiler (AOTAutograd, then eager kernels);
# the GPU run with the engine's default, Inductor.
DRY_BACKEND = "aot_eager"
COLUMNS = ["case", "first call", "step", "TFLOP/s", "vs eager", "rel diff vs eager", "peak allocated"]


def dynamo_counts() -> tuple[int, int]:
    """(unique graphs compiled, graph breaks) so far in this process."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def nans(out: torch.Tensor) -> str:
    """' (NaN in n of m outputs)' when the output has any NaN, else ''."""
    n = int(out.isnan().sum().item())
    return f" (NaN in {n} of {out.numel()} outputs)" if n else ""


def first_call(model, inputs, device) -> tuple[torch.Tensor, float]:
    sync(device)
    t0 = time.perf_counter()
    out = model(*inputs)
    sync(device)
    return out, time.perf_counter() - t0


def calls(ctx: Ctx, model, inputs, runs: int, warmup: int) -> tuple[torch.Tensor, float, float, Peak]:
    """(output of the first call, its seconds, median step seconds of ``runs`` after ``warmup`` more
    calls, memory peaks)."""
    with Peak(ctx.device) as peak:
        out, first = first_call(model, inputs, ctx.device)
        step = timed(lambda: model(*inputs), ctx.device, runs=runs, warmup=warmup)
    return out, first, step, peak


def run(ctx: Ctx) -> dict:
    from wan.optim.compile import compile_blocks_

    t_start = time.perf_counter()
    limit = ctx.time_left(0.8)
    # Caches of this run only: the first compile is a cold one whatever ran on the machine before.
    cache = tempfile.mkdtemp(prefix="compile-cache-", dir=ctx.work)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    options = {"backend": DRY_BACKEND} if ctx.dry else {}
    backend = options.get("backend", "inductor (default)")
    runs = 1 if ctx.dry else 3

    shape = ctx.dit_shape("1.3b")
    latent = ctx.latent_video(480, 832, 81)
    tokens = tokens_of(latent)
    flops = dit_flops(shape, tokens)
    model = random_dit(shape, ctx.device, seed=ctx.seed)
    inputs = dit_inputs(ctx, shape, latent)
    rows, data = [], {"tokens": tokens, "backend": backend, "flops": flops}
    dash = "–"

    with torch.inference_mode():
        eager_out, eager_first, eager, peak = calls(ctx, model, inputs, runs, warmup=0)
        data["eager"] = {"first_call_seconds": eager_first, "seconds": eager, "peak_allocated": peak.allocated}
        rows.append(["eager", ms(eager_first), ms(eager), tflops(flops, eager), "1.00x", "0 (reference)",
                     gib(peak.allocated)])

        graphs0, breaks0 = dynamo_counts()
        try:
            blocks = compile_blocks_(model, **options)
            out, compile_first, step, peak = calls(ctx, model, inputs, runs, warmup=1)
            graphs, breaks = dynamo_counts()
            diff = rel_diff(out, eager_out)
            data["compiled"] = {"blocks": blocks, "first_call_seconds": compile_first, "seconds": step, "rel_diff": diff,
                                "graphs": graphs - graphs0, "graph_breaks": breaks - breaks0,
                                "peak_allocated": peak.allocated}
            data["compiled"]["nan"] = nans(out)
            rows.append([f"compiled, {blocks} blocks, cold caches", ms(compile_first), ms(step), tflops(flops, step),
                         f"{eager / step:.2f}x", f"{diff:.2e}{nans(out)}", gib(peak.allocated)])
        except Exception as e:
            data["compiled"] = {"error": case_error(e)}
            rows.append(["compiled, cold caches", case_error(e)] + [dash] * 5)
        out = None
        free_memory()

        # Again with Dynamo's memory cleared: the on-disk caches written above now hit.
        left = limit - (time.perf_counter() - t_start)
        cold = data["compiled"].get("first_call_seconds")
        if cold is None:
            rows.append(["compiled again, warm on-disk caches", "skipped: the cold compile failed"] + [dash] * 5)
        elif left < cold + 4 * eager + 5:
            rows.append(["compiled again, warm on-disk caches", "skipped: the part's time limit is near"] + [dash] * 5)
        else:
            try:
                torch._dynamo.reset()
                compile_blocks_(model, **options)
                out, warm_first = first_call(model, inputs, ctx.device)
                diff = rel_diff(out, eager_out)
                data["compiled_warm"] = {"first_call_seconds": warm_first, "rel_diff": diff}
                rows.append(["compiled again, warm on-disk caches", ms(warm_first), dash, dash, dash,
                             f"{diff:.2e}{nans(out)}", dash])
            except Exception as e:
                data["compiled_warm"] = {"error": case_error(e)}
                rows.append(["compiled again, warm on-disk caches", case_error(e)] + [dash] * 5)
    model = eager_out = out = None
    free_memory()
    shutil.rmtree(cache, ignore_errors=True)

    latent_text = "x".join(map(str, latent))
    compiled = data["compiled"]
    notes = [f"backend {backend}" + (" (the dry run: no C++ compiler needed; the GPU run uses the engine's default, "
                                     "Inductor)" if ctx.dry else " with default options, as the engine calls "
                                     "compile_blocks_") + "; Inductor's and Triton's caches in a fresh folder, so "
             "the first compiled call is a cold compile.",
             f"latent {latent_text} ({tokens} tokens), 24 text tokens, random bf16 weights, torch.inference_mode; "
             f"step: median of {runs} (the compiled one after one more warm-up); 'first call' includes the compile; "
             "TFLOP/s counts the reference's 512 text rows; 'vs eager' is eager's step over the compiled step."]
    if ctx.dry:
        notes.append("Dry run: aot_eager keeps no on-disk cache, so its third row only traces again.")
    if "graphs" in compiled:
        notes.append(f"Dynamo compiled {compiled['graphs']} graph(s) with {compiled['graph_breaks']} graph break(s) "
                     f"for {compiled['blocks']} blocks (one graph shared by all blocks is the aim).")
    return measured(COLUMNS, rows, notes=notes, data=data)
