"""Weight quantisation at Wan 2.1 1.3B shape on CPU: weight memory, forward time and output
difference of each mode against the plain bf16 model.

    .venv/bin/python benchmarks/bench_quant.py                 # markdown table out
    .venv/bin/python benchmarks/bench_quant.py --frames 5 --size 128 --runs 5

The models are built in memory (random bf16 weights, std 0.02, with the reference's float32
modules, one seed for all) and kept side by side (about 7 GiB); after one warm-up forward each, the
cases are timed interleaved (bf16, fp8, ..., bf16, fp8, ...) so a busy shared machine slows them
alike, and compared as ratios of medians.

The cases "+ dtype helper" simulate the proposed change to wan/models/dit.py (read a layer's
``compute_dtype`` instead of ``layer.weight.dtype``, which dequantises a whole weight only to learn
its dtype): ``QuantLinear.weight`` is patched to an empty tensor of the compute dtype for them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench_dit import SHAPE_13B  # noqa: E402
MODES = ("fp8", "fp8_scaled", "int8")
HELPER_CASES = ("fp8_scaled", "int8")


def build_model():
    from wan.models.dit import DiTConfig, WanDiT
    with torch.device("meta"):
        model = WanDiT(DiTConfig(**SHAPE_13B))
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            dtype = torch.float32 if WanDiT.keep_in_fp32(name) else torch.bfloat16
            p.data = (torch.randn(p.shape, generator=g) * 0.02).to(dtype)
    return model.eval().requires_grad_(False)


def make_inputs(frames: int, size: int):
    g = torch.Generator().manual_seed(1)
    lat = size // 8
    return (torch.randn(1, 16, frames, lat, lat, generator=g), torch.tensor([757.0]),
            torch.randn(1, 24, 4096, generator=g))


def main() -> None:
    from wan.models.dit import WanDiT
    from wan.optim import quant

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    models, ratios = {"bf16": build_model()}, {"bf16": 1.0}
    for mode in MODES:
        models[mode] = build_model()
        ratios[mode] = quant.quantize_(models[mode], mode, keep=WanDiT.keep_in_fp32).ratio
    property_weight = quant.QuantLinear.weight
    helper_weight = property(lambda self: torch.empty(0, dtype=self.compute_dtype, device="meta"))
    cases = [(m, m, False) for m in models] + [(f"{m} + dtype helper", m, True) for m in HELPER_CASES]

    x, t, ctx = make_inputs(args.frames, args.size)
    outputs, times = {}, {name: [] for name, _, _ in cases}
    with torch.inference_mode():
        for run in range(args.runs + 1):          # run 0 warms up
            for name, model_key, helper in cases:
                quant.QuantLinear.weight = helper_weight if helper else property_weight
                t0 = time.perf_counter()
                out = models[model_key](x, t, ctx)
                if run:
                    times[name].append(time.perf_counter() - t0)
                outputs.setdefault(name, out)
            print(f"run {run} done", file=sys.stderr)
    quant.QuantLinear.weight = property_weight

    ref, gib = outputs["bf16"], 1024 ** 3
    base_bytes, base_time = quant.module_bytes(models["bf16"]), statistics.median(times["bf16"])
    print(f"DiT 1.3B shape, latent 16x{args.frames}x{args.size // 8}x{args.size // 8}, 24 text tokens, "
          f"{torch.get_num_threads()} threads, median of {args.runs} interleaved runs\n")
    print("| mode | weights (GiB) | vs bf16 | quantised layers | forward (s) | time vs bf16 | output rel. err vs bf16 |")
    print("|---|---|---|---|---|---|---|")
    for name, model_key, _ in cases:
        size = quant.module_bytes(models[model_key])
        med = statistics.median(times[name])
        err = ((outputs[name] - ref).abs().max() / ref.abs().max()).item()
        print(f"| {name} | {size / gib:.2f} | {base_bytes / size:.2f}x | {ratios[model_key]:.2f}x | {med:.2f} | "
              f"{med / base_time:.2f} | {err:.4f} |")


if __name__ == "__main__":
    main()
