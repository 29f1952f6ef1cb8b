"""Block streaming at Wan 2.1 1.3B shape: peak memory and time against a normally loaded DiT.

    .venv/bin/python benchmarks/bench_offload.py                 # markdown table out
    .venv/bin/python benchmarks/bench_offload.py --frames 5 --size 128 --runs 3 --prefetch 1
    .venv/bin/python benchmarks/bench_offload.py --quantize fp8_scaled --resident 15

``--quantize MODE`` quantises both sides (the loaded DiT with ``quantize_`` after loading, the
streamed one as each block is read); ``--resident N`` keeps N blocks of the streamed DiT resident.

The checkpoint is bench_dit.py's (random bf16 weights in the official layout, written once to
benchmarks/.cache/). Memory: each case in a fresh subprocess, the peak resident growth from before
loading to the end of the first forward (so the model and the activations both count). Time:
streamed and loaded forwards interleaved in one process, ratio of medians; the same process checks
that the two outputs are identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_dit import checkpoint_path, make_inputs, write_checkpoint  # noqa: E402
from memory import peak_bytes, reset_peak, run_case  # noqa: E402

DTYPE = torch.bfloat16


def load(kind: str, path: Path, prefetch: int, quantize: str = "none", resident: int = 0):
    """Returns (dit, handle or None)."""
    if kind == "loaded":
        import wan
        dit = wan.load_transformer(path, dtype=DTYPE)
        if quantize != "none":
            from wan.models.dit import WanDiT
            from wan.optim.quant import quantize_
            quantize_(dit, quantize, keep=WanDiT.keep_in_fp32)
        return dit, None
    from wan.optim.offload import load_transformer_streamed
    return load_transformer_streamed(path, dtype=DTYPE, prefetch=prefetch, quantize=quantize,
                                     budget_blocks=resident or None)


def case_memory(kind: str, path: Path, prefetch: int, frames: int, size: int, quantize: str = "none",
                resident: int = 0) -> dict:
    inputs = make_inputs(frames, size)
    base = reset_peak()
    t0 = time.perf_counter()
    dit, handle = load(kind, path, prefetch, quantize, resident)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        dit(*inputs)
    out = {"peak_growth": peak_bytes() - base, "load_s": load_s}
    if handle is not None:
        out["largest_block"] = handle.largest_block_bytes
        out["resident_weights"] = sum(t.numel() * t.element_size() for t in [*dit.parameters(), *dit.buffers()]
                                      if not t.is_meta)
        handle.close()
    return out


def case_time(path: Path, prefetch: int, frames: int, size: int, runs: int, quantize: str = "none",
              resident: int = 0) -> dict:
    inputs = make_inputs(frames, size)
    streamed, handle = load("streamed", path, prefetch, quantize, resident)
    loaded, _ = load("loaded", path, prefetch, quantize)
    times = {"streamed": [], "loaded": []}
    with torch.inference_mode():
        same = torch.equal(streamed(*inputs), loaded(*inputs))  # also the warm-up of both
        for _ in range(runs):
            for name, dit in (("streamed", streamed), ("loaded", loaded)):
                t0 = time.perf_counter()
                dit(*inputs)
                times[name].append(time.perf_counter() - t0)
    handle.close()
    return {"identical": same, **{k: statistics.median(v) for k, v in times.items()}}


def in_subprocess(*args: str) -> dict:
    return run_case(__file__, *args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=5, help="latent frames (5 = a 17-frame clip)")
    ap.add_argument("--size", type=int, default=128, help="video width and height in pixels")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--quantize", default="none", choices=("none", "fp8", "fp8_scaled", "int8"))
    ap.add_argument("--resident", type=int, default=0, help="blocks of the streamed DiT kept resident")
    ap.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = checkpoint_path()
    if args.case:
        kind = args.case[0]
        result = (case_time(path, args.prefetch, args.frames, args.size, args.runs, args.quantize, args.resident)
                  if kind == "time" else
                  case_memory(kind, path, args.prefetch, args.frames, args.size, args.quantize, args.resident))
        print(json.dumps(result))
        return

    if not path.exists():
        print(f"writing {path} ...", file=sys.stderr)
        write_checkpoint(path)
    common = ["--prefetch", str(args.prefetch), "--frames", str(args.frames), "--size", str(args.size),
              "--runs", str(args.runs), "--quantize", args.quantize, "--resident", str(args.resident)]
    mem = {kind: in_subprocess(kind, *common) for kind in ("loaded", "streamed")}
    timing = in_subprocess("time", *common)

    gib, mib = 2**30, 2**20
    file_bytes = path.stat().st_size
    block = mem["streamed"]["largest_block"]
    tokens = args.frames * (args.size // 16) ** 2
    quant = f", quantised {args.quantize}" if args.quantize != "none" else ""
    print(f"\nDiT 1.3B shape, bf16{quant}, latent 16x{args.frames}x{args.size // 8}x{args.size // 8} ({tokens} tokens), "
          f"prefetch {args.prefetch}, {args.resident} blocks resident, {torch.get_num_threads()} threads; "
          f"checkpoint {file_bytes / gib:.2f} GiB, largest block {block / mib:.0f} MiB\n")
    print("| measure | loaded | streamed | ratio |\n|---|---|---|---|")
    lo, st = mem["loaded"]["peak_growth"], mem["streamed"]["peak_growth"]
    print(f"| peak memory, load + first forward (MiB) | {lo / mib:.0f} | {st / mib:.0f} | {st / lo:.3f} |")
    print(f"| ... in checkpoint sizes | {lo / file_bytes:.2f} | {st / file_bytes:.3f} | |")
    print(f"| ... in largest blocks | {lo / block:.1f} | {st / block:.1f} | |")
    print(f"| resident weights (MiB) | {lo / mib:.0f}* | {mem['streamed']['resident_weights'] / mib:.0f} | |")
    print(f"| load time (s) | {mem['loaded']['load_s']:.2f} | {mem['streamed']['load_s']:.2f} | |")
    print(f"| forward time, median of {args.runs} interleaved (s) | {timing['loaded']:.3f} | {timing['streamed']:.3f} | "
          f"{timing['streamed'] / timing['loaded']:.2f} |")
    print(f"\noutputs identical (torch.equal): {timing['identical']}")
    print("* the loaded model's peak includes its weights and the forward's activations")
    print(f"\ncommand: .venv/bin/python benchmarks/bench_offload.py --frames {args.frames} --size {args.size} "
          f"--runs {args.runs} --prefetch {args.prefetch} --quantize {args.quantize} --resident {args.resident}")


if __name__ == "__main__":
    main()
