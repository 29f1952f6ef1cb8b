"""The prepared GPU check (scripts/gpu_check.sh, benchmarks/gpu_check.py): its CPU dry run writes a
JSON and a Markdown report with every part measured or skipped with a reason, and the driver
records a part that raises, hangs or dies as failed while the others still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
from gpu_parts import PARTS, Part  # noqa: E402

FAKE_PARTS = textwrap.dedent("""
    import os, time
    from gpu_parts.common import measured, skipped

    def ok(ctx):
        return measured(["case", "value"], [["a", 1.5]], notes=["fine"], data={"gemm_rate": 1e9})

    def raises(ctx):
        raise RuntimeError("CUDA error: an illegal memory access")

    def hangs(ctx):
        time.sleep(60)

    def dies(ctx):
        os._exit(3)

    def not_here(ctx):
        return skipped("needs sageattention")

    def sees_rate(ctx):
        return measured(["rate"], [[ctx.gemm_rate]])
""")


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    pkg = tmp_path / "fakeparts"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("ok", "raises", "hangs", "dies", "not_here", "sees_rate"):
        (pkg / f"{name}.py").write_text(FAKE_PARTS + f"\nrun = {name}\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return {name: f"fakeparts.{name}" for name in ("ok", "raises", "hangs", "dies", "not_here", "sees_rate")}


def test_driver_records_each_failure_and_goes_on(tmp_path, fake_parts):
    # only the hanging part meets its limit; the others get time for a slow start on a busy machine
    parts = [Part(name, name.replace("_", " "), 60, dry_limit_s=4 if name == "hangs" else 60) for name in fake_parts]
    report = gpu_check.run_all(parts, dry=True, out=tmp_path / "out", budget_s=120, modules=fake_parts, date="2026-01-02")
    got = report["parts"]
    assert list(got) == list(fake_parts)
    assert got["ok"]["status"] == "measured" and got["ok"]["rows"] == [["a", 1.5]]
    assert got["raises"]["status"] == "failed" and "illegal memory access" in got["raises"]["error"]
    assert got["hangs"]["status"] == "failed" and "timed out after 4 s" in got["hangs"]["error"]
    assert got["dies"]["status"] == "failed" and "ended with code 3" in got["dies"]["error"]
    assert got["not_here"] == {"status": "skipped", "reason": "needs sageattention", "seconds": got["not_here"]["seconds"],
                               "title": "not here"}
    # the rate one part measured reaches the parts after it
    assert got["sees_rate"]["rows"] == [[1e9]]
    saved = json.loads((tmp_path / "out" / "2026-01-02_cpu-dry-run.json").read_text())
    assert saved["parts"] == got
    md = (tmp_path / "out" / "2026-01-02_cpu-dry-run.md").read_text()
    assert "## 2. raises: failed" in md and "illegal memory access" in md
    assert "## 5. not here: skipped" in md and "| a | 1.5 |" in md


def test_driver_skips_parts_once_the_budget_is_spent(tmp_path, fake_parts, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_PART_S", 2)
    parts = [Part("hangs", "hangs", 60, dry_limit_s=60), Part("ok", "ok", 60)]
    report = gpu_check.run_all(parts, dry=True, out=tmp_path, budget_s=3, modules=fake_parts)
    assert report["parts"]["hangs"]["status"] == "failed"  # cut at the budget, not at its own 60 s
    assert report["parts"]["ok"] == {"status": "skipped", "reason": "the run's time budget (3 s) was spent",
                                     "seconds": 0, "title": "ok"}


def test_gpu_slug():
    assert gpu_check.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_dry_run_of_every_part(tmp_path):
    """The script as CI runs it: each part of the real check on the CPU with tiny shapes."""
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (json_path,) = out.glob("*_cpu-dry-run.json")
    report = json.loads(json_path.read_text())
    log = json_path.with_suffix(".log").read_text()
    assert report["dry_run"] is True
    assert list(report["parts"]) == [p.name for p in PARTS]
    for name, part in report["parts"].items():
        assert part["status"] == "measured", f"{name}: {part}\n{log[-3000:]}"
        assert part["rows"] and all(len(r) == len(part["columns"]) for r in part["rows"]), name
    md = json_path.with_suffix(".md").read_text()
    for i, p in enumerate(PARTS, 1):
        assert f"## {i}. {p.title}: measured" in md
