"""The prepared GPU check: every CUDA path of the project measured in one short run.

    bash scripts/gpu_check.sh               # on the lent GPU machine (installs the carried wheels)
    bash scripts/gpu_check.sh --dry-run     # the same driver on the CPU with tiny shapes (CI runs it)
    .venv/bin/python benchmarks/gpu_check.py --dry-run --parts dit,vae   # some parts only

Each part (``benchmarks/gpu_parts``) runs in a process of its own under its own time limit, so a
part that fails, hangs or takes the GPU down is recorded as failed and the others still run. The
whole run keeps to ``--budget`` seconds: a part that would start with too little time left is
recorded as skipped with that reason. Results are written after every part, so a run cut short
still leaves what it measured:

    <out>/<date>_<gpu>.json   every part: measured (its table and raw numbers), skipped (why) or
                              failed (the error)
    <out>/<date>_<gpu>.md     the same as Markdown tables
    <out>/<date>_<gpu>.log    every part's own output

``<out>`` is ``benchmarks/gpu`` (``--out`` to change it); in the dry run ``<gpu>`` is
``cpu-dry-run``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from gpu_parts import PARTS, Part, part_named  # noqa: E402

STATUSES = ("measured", "skipped", "failed")
MIN_PART_S = 10  # a part is not started with less time than this left in the budget


# -- one part, in its own process ----------------------------------------------------------------


def run_one(module: str, dry: bool, gemm_rate: float | None, result_path: Path, limit_s: float,
            started: float | None = None) -> int:
    """Runs one part in this process and writes its result (a dict with ``status``) to
    ``result_path``; an exception is written as a failed result."""
    import torch
    from gpu_parts.common import Ctx
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    ctx = Ctx(dry=dry, device=device, gemm_rate=gemm_rate, limit_s=limit_s, started=started or time.monotonic())
    ctx.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        result = importlib.import_module(module).run(ctx)
        if not isinstance(result, dict) or result.get("status") not in ("measured", "skipped"):
            raise TypeError(f"part {module} returned {result!r}: expected measured(...) or skipped(...)")
    except Exception as e:  # recorded, never raised: the driver goes on with the next part
        traceback.print_exc()
        result = failed(f"{type(e).__name__}: {e}")
    result["seconds"] = round(time.perf_counter() - t0, 2)
    write_atomic(result_path, json.dumps(result, default=str))
    return 0


def failed(error: str) -> dict:
    return {"status": "failed", "error": error.strip()[-2000:]}


def run_isolated(part: Part, module: str, *, dry: bool, gemm_rate: float | None, limit_s: float, log) -> dict:
    """Runs ``part`` in a child process with a time limit; its output goes to ``log``."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part.name, "--module", module,
               "--result", str(result_path), "--limit", repr(float(limit_s)), "--started", repr(time.monotonic())]
        if dry:
            cmd.append("--dry-run")
        if gemm_rate:
            cmd += ["--gemm-rate", repr(gemm_rate)]
        log.write(f"\n===== {part.name} (limit {limit_s:.0f} s) =====\n")
        log.flush()
        start = log.tell()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            code = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return dict(failed(f"timed out after {limit_s:.0f} s (the part's limit)"),
                        seconds=round(time.perf_counter() - t0, 2))
        if result_path.exists():
            return json.loads(result_path.read_text())
        log.flush()
        tail = _tail(Path(log.name), start)
        return dict(failed(f"the part's process ended with code {code} and no result: {tail}"),
                    seconds=round(time.perf_counter() - t0, 2))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(path: Path, start: int, chars: int = 1500) -> str:
    with open(path, errors="replace") as fh:
        fh.seek(start)
        return fh.read()[-chars:].strip()


# -- the whole run -------------------------------------------------------------------------------


def gpu_slug(name: str) -> str:
    """A file-name-safe form of a device name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def run_all(parts: list[Part], *, dry: bool, out: Path, budget_s: float, modules: dict[str, str] | None = None,
            date: str | None = None) -> dict:
    """Runs ``parts`` one after another and writes the JSON, Markdown and log under ``out`` after
    each; returns the report."""
    modules = modules or {}
    date = date or _dt.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    report = {"schema": 1, "date": date, "dry_run": dry, "gpu": "cpu-dry-run" if dry else None,
              "budget_s": budget_s, "parts": {}}
    stem = f"{date}_{report['gpu'] or 'gpu'}"
    log_path = out / f"{stem}.log"
    t_start = time.perf_counter()
    gemm_rate = None
    with open(log_path, "w") as log:
        for i, part in enumerate(parts, 1):
            left = budget_s - (time.perf_counter() - t_start)
            limit = min(part.dry_limit_s if dry else part.limit_s, left)
            if left < MIN_PART_S:
                result = {"status": "skipped", "reason": f"the run's time budget ({budget_s:.0f} s) was spent", "seconds": 0}
            else:
                module = modules.get(part.name, f"gpu_parts.{part.name}")
                result = run_isolated(part, module, dry=dry, gemm_rate=gemm_rate, limit_s=limit, log=log)
            result["title"] = part.title
            report["parts"][part.name] = result
            data = result.get("data", {})
            if data.get("gemm_rate"):
                gemm_rate = float(data["gemm_rate"])
            if data.get("gpu_name") and not dry and report["gpu"] is None:
                report["gpu"] = data["gpu_name"]
                new_stem = f"{date}_{gpu_slug(data['gpu_name'])}"
                log.flush()
                os.replace(log_path, out / f"{new_stem}.log")
                log_path, stem = out / f"{new_stem}.log", new_stem
            report["seconds"] = round(time.perf_counter() - t_start, 1)
            _write_report(report, out, stem)
            print(f"[{i}/{len(parts)}] {part.name}: {_status_line(result)}", flush=True)
    report["files"] = [str(out / f"{stem}.{ext}") for ext in ("json", "md", "log")]
    return report


def _status_line(result: dict) -> str:
    status = result["status"]
    why = result.get("reason") or result.get("error") or ""
    return f"{status} ({result.get('seconds', 0):.1f} s)" + (f": {why.splitlines()[-1][:160]}" if why else "")


def _write_report(report: dict, out: Path, stem: str) -> None:
    write_atomic(out / f"{stem}.json", json.dumps(report, indent=1, default=str))
    write_atomic(out / f"{stem}.md", to_markdown(report))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_markdown(report: dict) -> str:
    """The report as Markdown: one heading and table per part, in the order they ran."""
    gpu = report.get("gpu") or "no GPU recorded"
    lines = [f"# GPU check: {gpu}, {report['date']}", ""]
    if report.get("dry_run"):
        lines += ["Dry run: the CPU with tiny shapes. The numbers only show that each path runs.", ""]
    lines += [f"Whole run: {report.get('seconds', 0):.0f} s of a {report['budget_s']:.0f} s budget.", ""]
    for i, (name, r) in enumerate(report["parts"].items(), 1):
        head = f"## {i}. {r.get('title', name)}: {r['status']} ({r.get('seconds', 0):.1f} s)"
        lines += [head, ""]
        if r["status"] == "measured":
            lines.append("| " + " | ".join(r["columns"]) + " |")
            lines.append("|" + "---|" * len(r["columns"]))
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in r["rows"]]
            lines.append("")
            lines += [f"- {n}" for n in r.get("notes", [])]
        else:
            why = r.get("reason") or r.get("error") or ""
            lines.append(("Skipped: " if r["status"] == "skipped" else "Failed: ") + "`" + why.replace("`", "'").replace("\n", " ⏎ ")[-600:] + "`")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the CPU with tiny shapes (checks that every part runs)")
    ap.add_argument("--parts", help=f"comma-separated parts to run (default all: {','.join(p.name for p in PARTS)})")
    ap.add_argument("--out", type=Path, default=HERE / "gpu", help="folder of the JSON, Markdown and log (benchmarks/gpu)")
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default 480 on a GPU, 900 dry)")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--module", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--gemm-rate", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=float, default=120.0, help=argparse.SUPPRESS)
    ap.add_argument("--started", type=float, help=argparse.SUPPRESS)  # the driver's time.monotonic() (system-wide)
    args = ap.parse_args(argv)
    if args.part:
        return run_one(args.module or f"gpu_parts.{args.part}", args.dry_run, args.gemm_rate, args.result, args.limit,
                       args.started)
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; on a machine without a GPU run it with --dry-run", file=sys.stderr)
            return 2
    try:
        parts = [part_named(n.strip()) for n in args.parts.split(",")] if args.parts else list(PARTS)
    except ValueError as e:
        print(f"gpu_check: --parts: {e}", file=sys.stderr)
        return 2
    budget = args.budget or (900.0 if args.dry_run else 480.0)
    report = run_all(parts, dry=args.dry_run, out=args.out, budget_s=budget)
    print("\n".join(report["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
