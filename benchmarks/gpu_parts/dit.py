"""Part 2: the DiT forward in bf16 at 480p, 81 frames (32,760 tokens), at 1.3B shape whole and at
14B shape from one and two blocks scaled to the full 40.

The 14B estimate: t(n blocks) = rest + n * block, so block = t(2) - t(1) and the full model is
t(1) + 39 * block (the embeddings and the head run once either way). FLOPs are the reference
computation's (512 text rows); MFU is their rate against the measured bf16 GEMM rate.
"""

from __future__ import annotations

import torch

from gpu_parts.common import (Ctx, Peak, dit_flops, dit_inputs, gib, measured, mfu, ms, random_dit, tflops,
                              timed, tokens_of)


def forward_time(ctx: Ctx, shape: dict, latent, num_layers: int | None = None, runs: int = 3) -> tuple[float, int]:
    """(median forward seconds, peak allocated bytes) of a random DiT of ``shape``."""
    model = random_dit(shape, ctx.device, num_layers=num_layers, seed=ctx.seed)
    inputs = dit_inputs(ctx, shape, latent)
    with torch.inference_mode():
        with Peak(ctx.device) as peak:
            seconds = timed(lambda: model(*inputs), ctx.device, runs=runs)
    return seconds, peak.allocated  # the model is freed on return (Peak frees memory before each case)


def run(ctx: Ctx) -> dict:
    latent = ctx.latent_video(480, 832, 81)
    tokens = tokens_of(latent)
    rows, data = [], {"tokens": tokens}

    shape = ctx.dit_shape("1.3b")
    t, peak = forward_time(ctx, shape, latent)
    flops = dit_flops(shape, tokens)
    data["1.3b"] = {"seconds": t, "flops": flops, "peak_allocated": peak}
    rows.append(["1.3B, whole model", ms(t), tflops(flops, t), mfu(ctx, flops, t), gib(peak)])

    shape = ctx.dit_shape("14b")
    t1, _ = forward_time(ctx, shape, latent, num_layers=1)
    t2, peak2 = forward_time(ctx, shape, latent, num_layers=2)
    flops = dit_flops(shape, tokens)
    block_flops = dit_flops(shape, tokens, num_layers=2) - dit_flops(shape, tokens, num_layers=1)
    data["14b"] = {"seconds_1_block": t1, "seconds_2_blocks": t2, "flops": flops, "peak_allocated_2_blocks": peak2}
    if t2 > t1:
        block = t2 - t1
        full = t1 + (shape["num_layers"] - 1) * block
        data["14b"].update(block_seconds=block, full_seconds_estimate=full)
        rows.append(["14B, one block (t(2) - t(1))", ms(block), tflops(block_flops, block), mfu(ctx, block_flops, block),
                     gib(peak2)])
        rows.append([f"14B, {shape['num_layers']} blocks (estimate)", ms(full), tflops(flops, full), mfu(ctx, flops, full),
                     "–"])
    else:  # the block's time is below the timer's noise (the dry run's tiny shape)
        rows.append(["14B, one block (t(2) - t(1))", f"– (t(2) {ms(t2)} <= t(1) {ms(t1)})", "–", "–", gib(peak2)])
    latent_text = "x".join(map(str, latent))
    return measured(["model", "forward", "TFLOP/s", "MFU", "peak allocated"], rows, data=data,
                    notes=[f"latent {latent_text} ({tokens} tokens), 24 text tokens, bf16 weights with the reference's "
                           "float32 modules, median of 3 after one warm-up; the attention backend is the default (sdpa)."])
