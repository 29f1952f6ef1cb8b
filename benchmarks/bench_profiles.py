"""Each shipped profile's load settings on a 1.3B-shape DiT (bf16 checkpoint, CPU): peak memory
of loading plus a forward, and the forward time, each profile in a fresh subprocess.

    .venv/bin/python benchmarks/bench_profiles.py [--frames 5 --size 128]

On a CPU the memory side of a profile is: stream the DiT's blocks from the checkpoint (offload
"blocks", blocks_to_swap), quantise it, and its precision. Profiles that differ only in GPU budgets
or step savers load the same way here; the step savers are measured by bench_savers.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_dit import checkpoint_path, make_inputs, run_ours, write_checkpoint  # noqa: E402
from memory import peak_bytes, reset_peak  # noqa: E402


def case(name: str, frames: int, size: int) -> dict:
    from wan.engine.model_manager import ModelManager
    from wan.optim.apply import load_settings
    from wan.optim.apply import resolve_profile
    profile = resolve_profile(name)
    stream, prefetch, swap, quant, _te, _compile = load_settings(profile)
    manager = ModelManager(device="cpu", dtype=torch.bfloat16)
    notes: list[str] = []
    base = reset_peak()
    t0 = time.perf_counter()
    dit, handle = manager._load_dit(checkpoint_path(), manager._dit_dtype(profile), stream, prefetch, swap, quant, notes)
    load_s = time.perf_counter() - t0
    inputs = make_inputs(frames, size)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            t0 = time.perf_counter()
            run_ours(dit, inputs)
            times.append(time.perf_counter() - t0)
    peak = peak_bytes() - base
    if handle is not None:
        handle.close()
    return {"peak": peak, "load_s": load_s, "forward_s": statistics.median(times[1:]), "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.frames, args.size)))
        return
    path = checkpoint_path()
    if not path.exists():
        write_checkpoint(path)
    from wan.optim.profile_files import load_profiles
    names = [p for p in load_profiles().names() if p != "auto"]
    rows = []
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--case", name, "--frames", str(args.frames),
                              "--size", str(args.size)], capture_output=True, text=True)
        if out.returncode:
            rows.append((name, None, out.stderr.strip().splitlines()[-1]))
            continue
        rows.append((name, json.loads(out.stdout.strip().splitlines()[-1]), ""))
    size = path.stat().st_size
    print(f"\nProfiles on a 1.3B-shape DiT (bf16 checkpoint {size / 2**30:.2f} GiB), CPU, "
          f"latent 16x{args.frames}x{args.size // 8}x{args.size // 8}, {torch.get_num_threads()} threads\n")
    print("| profile | how the DiT loads here | peak memory (GiB) | x checkpoint | forward (s) |\n|---|---|---|---|---|")
    for name, r, err in rows:
        if r is None:
            print(f"| {name} | error: {err} | | | |")
            continue
        how = "; ".join(r["notes"]) or "loaded whole"
        print(f"| {name} | {how} | {r['peak'] / 2**30:.2f} | {r['peak'] / size:.2f} | {r['forward_s']:.2f} |")


if __name__ == "__main__":
    main()
