"""Memory of reading an input video for a short job: a few frames of a long 720p upload.

    .venv/bin/python benchmarks/bench_video_input.py                    # 5 of 240 frames, 1280x720 -> 832x480
    .venv/bin/python benchmarks/bench_video_input.py --take 81 --out 1280x720
    .venv/bin/python benchmarks/bench_video_input.py --tree /tmp/old    # the same cases on another checkout

The clip is written once with constant frames (a few KB, as the upload of the issue: a small file can
hold many large frames). Each case runs in a fresh subprocess and reports its peak resident memory
above what it held after the imports (``memory.py``: VmHWM reset through ``/proc/self/clear_refs``):

- ``job``: what a v2v job does, ``Inputs.video("video", take, h, w)`` (squash), the engine's reader;
- ``job_cover``: the same with ``fit="cover"`` (VACE control and mask videos);
- ``whole``: ``load_video(path)``, every frame decoded to float32 (what the job did before: the old
  ``Inputs.video`` decoded the whole file, then sliced and resized);
- ``probe``: ``probe_video(path)``, the submit-time header check, with its time.

``--tree`` puts another checkout first on the import path of the cases, e.g. the code before this
change (``git archive <commit> | tar -x -C /tmp/old``), whose ``job`` is the former behaviour.
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

from memory import peak_bytes, reset_peak, run_case  # noqa: E402

MB = 2**20


def write_clip(path: Path, frames: int, width: int, height: int) -> None:
    """Constant grey frames, H.264: a tiny file of large frames."""
    import av
    import numpy as np
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=16, options={"preset": "ultrafast"})
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 128, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def case(tree: str, kind: str, path: str, take: int, width: int, height: int) -> dict:
    """One measurement in this (fresh) process."""
    if tree:
        sys.path.insert(0, tree)
    sys.path.insert(1 if tree else 0, str(ROOT))
    from types import SimpleNamespace

    import av  # noqa: F401  (imports are not part of the measurement)
    import torch  # noqa: F401

    import wan.engine.media_in as media_in
    from wan.engine.conditioning import Inputs

    base = reset_peak()
    t0 = time.perf_counter()
    if kind in ("job", "job_cover"):
        inputs = Inputs(SimpleNamespace(video=path))
        out = inputs.video("video", take, height, width, fit="cover" if kind == "job_cover" else "squash")
        shape = list(out.shape)
    elif kind == "whole":
        out, _ = media_in.load_video(path)
        shape = list(out.shape)
    else:
        shape = list(media_in.probe_video(path))
    seconds = time.perf_counter() - t0
    return {"peak_above_base_mb": (peak_bytes() - base) / MB, "seconds": seconds, "result": shape,
            "module": media_in.__file__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs=6, metavar=("TREE", "KIND", "PATH", "TAKE", "W", "H"), help=argparse.SUPPRESS)
    ap.add_argument("--frames", type=int, default=240, help="frames of the input clip")
    ap.add_argument("--size", default="1280x720", help="input clip WxH")
    ap.add_argument("--take", type=int, default=5, help="frames the job needs")
    ap.add_argument("--out", default="832x480", help="output WxH of the job")
    ap.add_argument("--tree", default="", help="another checkout to measure (put first on the import path)")
    ap.add_argument("--cases", default="job,job_cover,whole,probe")
    args = ap.parse_args()
    if args.case:
        tree, kind, path, take, w, h = args.case
        print(json.dumps(case(tree, kind, path, int(take), int(w), int(h))))
        return
    in_w, in_h = (int(v) for v in args.size.split("x"))
    out_w, out_h = (int(v) for v in args.out.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        write_clip(clip, args.frames, in_w, in_h)
        print(f"input: {args.frames} frames {in_w}x{in_h}, {clip.stat().st_size / 1024:.1f} KB; "
              f"job: {args.take} frames at {out_w}x{out_h}; code: {args.tree or ROOT}\n")
        print("| case | peak above base (MB) | time (s) | result |")
        print("|---|---|---|---|")
        for kind in args.cases.split(","):
            r = run_case(__file__, args.tree, kind, str(clip), str(args.take), str(out_w), str(out_h))
            print(f"| {kind} | {r['peak_above_base_mb']:.0f} | {r['seconds']:.3f} | {r['result']} |")


if __name__ == "__main__":
    main()
