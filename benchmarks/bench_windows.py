"""Peak memory of sliding windows: 2 windows against 6, and one run of the same length beside each.

    .venv/bin/python benchmarks/bench_windows.py                       # TEST t2v, 64x64, windows of 17, overlap 5
    .venv/bin/python benchmarks/bench_windows.py --size 128x128 --window 33 --no_plain

Each window is decoded and written to the output file before the next one starts, so the peak of a
run should not grow with its number of windows. Each case runs in a fresh subprocess
(``memory.py``): it loads the TEST model, makes a warm-up clip of two windows (so that what is
allocated once, kernels' buffers, the writer, is in place), resets the peak (VmHWM), then generates
and writes the clip:

- ``windows N``: ``--frames`` for N windows of ``--window`` frames overlapping ``--overlap``;
- ``one run N``: the same number of frames in one run (what windows replace), for scale.

Reported: the process's peak resident size (what the criterion compares: 6 windows within 5% of
2), the peak above the level after the warm-up, the peak of what malloc has handed out
(``AllocatedPeak``: the resident size also keeps heap the allocator holds after a free), the
time, and the frames of the written file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from memory import AllocatedPeak, peak_bytes, reset_peak, run_case  # noqa: E402

MB = 2**20


def frames_for(windows: int, window: int, overlap: int) -> int:
    """Frames of a clip of exactly ``windows`` full windows (no discard)."""
    return window + (windows - 1) * (window - overlap)


def case(ckpt: str, out: str, kind: str, windows: int, window: int, overlap: int, width: int, height: int) -> dict:
    """One measurement in this (fresh) process."""
    sys.path.insert(0, str(ROOT))
    import torch

    from wan.engine import Engine, GenerationRequest
    from wan.engine.media import load_video
    from wan.engine.request_checks import Limits
    from wan.testing.tiny_family import ensure_tiny_checkpoints

    torch.set_num_threads(2)
    ensure_tiny_checkpoints(ckpt)
    engine = Engine(checkpoint_dir=ckpt, device="cpu", dtype=torch.float32, limits=Limits(max_frames=100_000))
    frames = frames_for(windows, window, overlap)
    base = GenerationRequest(model="test-tiny-t2v", prompt="a fox in the snow", seed=1, steps=2, width=width,
                             height=height, output_dir=out)
    # warm-up: two short windows, written (every kind of allocation a window makes happens once)
    engine.generate(base.replace(frames=frames_for(2, window, overlap), sliding_window_size=window,
                                 sliding_window_overlap=overlap, output_dir=str(Path(out) / "warm-up")))
    req = base.replace(frames=frames)
    if kind == "windows":
        req = req.replace(sliding_window_size=window, sliding_window_overlap=overlap)
    allocated = AllocatedPeak()
    level = reset_peak()
    allocated.start()
    t0 = time.perf_counter()
    result = engine.generate(req)
    seconds = time.perf_counter() - t0
    peak = peak_bytes()
    allocated.stop()
    written = load_video(result.files[0])[0].shape[1]
    return {"peak_mb": peak / MB, "above_warm_mb": (peak - level) / MB, "allocated_mb": allocated.peak / MB,
            "seconds": seconds, "frames": frames,
            "written": written, "windows": len(result.metadata.get("windows", [None]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs=8, help=argparse.SUPPRESS)
    ap.add_argument("--size", default="64x64", help="WxH of the clip")
    ap.add_argument("--window", type=int, default=17, help="frames per window (4k+1)")
    ap.add_argument("--overlap", type=int, default=5)
    ap.add_argument("--windows", default="2,6", help="window counts to compare")
    ap.add_argument("--no_plain", action="store_true", help="skip the one-run cases")
    args = ap.parse_args()
    if args.case:
        ckpt, out, kind, n, window, overlap, w, h = args.case
        print(json.dumps(case(ckpt, out, kind, int(n), int(window), int(overlap), int(w), int(h))))
        return
    w, h = (int(v) for v in args.size.split("x"))
    counts = [int(n) for n in args.windows.split(",")]
    cache = ROOT / "benchmarks" / ".cache" / "tiny"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("windows",) + (() if args.no_plain else ("one run",)):
            for n in counts:
                r = run_case(__file__, str(cache), tmp, "windows" if kind == "windows" else "plain", str(n),
                             str(args.window), str(args.overlap), str(w), str(h))
                rows.append((kind, n, r))
    print(f"TEST t2v at {w}x{h}, 2 steps, windows of {args.window} frames overlapping {args.overlap}\n")
    print("| case | frames | windows run | peak RSS (MB) | peak above warm-up (MB) | peak allocated (MB) "
          "| time (s) | frames written |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, n, r in rows:
        print(f"| {kind} ({n} windows' frames) | {r['frames']} | {r['windows']} | {r['peak_mb']:.0f} | "
              f"{r['above_warm_mb']:.0f} | {r['allocated_mb']:.0f} | {r['seconds']:.1f} | {r['written']} |")
    found = {n: r for kind, n, r in rows if kind == "windows"}
    if len(found) >= 2:
        lo, hi = found[min(counts)], found[max(counts)]
        ratio = hi["peak_mb"] / lo["peak_mb"]
        print(f"\npeak RSS at {max(counts)} windows / at {min(counts)} windows: {ratio:.3f} "
              f"({'within' if abs(ratio - 1) <= 0.05 else 'NOT within'} 5%); peak allocated: "
              f"{hi['allocated_mb'] / lo['allocated_mb']:.3f}")


if __name__ == "__main__":
    main()
