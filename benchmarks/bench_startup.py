"""Start-up time of the studio: process start to the first served page, side by side with the
smallest possible Gradio app (one textbox) started the same way, which is the floor any Gradio app
pays (Python, gradio's own imports, uvicorn).

    .venv/bin/python benchmarks/bench_startup.py [--repeats 5]

Each repeat starts both servers in turn as fresh subprocesses on free ports and polls ``GET /``
until it answers 200; the table gives the medians and their ratio. It also reports whether the
served studio process had imported torch by then (it should not: models load with the first job).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MINIMAL_APP = """
import gradio as gr, sys
with gr.Blocks(analytics_enabled=False) as demo:
    gr.Textbox(label="prompt")
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), quiet=True)
"""
ENV = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_page(command: list[str], port: int, cwd: Path, timeout: float = 120) -> tuple[float, subprocess.Popen]:
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.perf_counter() - start < timeout:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - start, proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{command[:3]} served nothing within {timeout} s")


def torch_loaded(pid: int) -> bool:
    """Whether the process has torch's shared library mapped (i.e. imported torch)."""
    maps = Path(f"/proc/{pid}/maps")
    return maps.exists() and "libtorch" in maps.read_text()


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ours, floor, torch_seen = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "minimal.py").write_text(MINIMAL_APP)
        for _ in range(args.repeats):
            port = free_port()
            t, proc = time_to_page([sys.executable, str(tmp / "minimal.py"), str(port)], port, tmp)
            floor.append(t)
            stop(proc)
            port = free_port()
            cmd = [sys.executable, str(ROOT / "wgp.py"), "--server-port", str(port), "--state-dir", str(tmp / "state"),
                   "--output-dir", str(tmp / "out"), "--checkpoint-dir", str(tmp / "ckpt"), "--lora-dir",
                   str(tmp / "loras")]
            t, proc = time_to_page(cmd, port, tmp)
            ours.append(t)
            torch_seen.append(torch_loaded(proc.pid))
            stop(proc)
    m_ours, m_floor = statistics.median(ours), statistics.median(floor)
    print(f"| start-up to first page | Wan Studio {m_ours:.2f} s | minimal gradio app {m_floor:.2f} s | "
          f"ratio {m_ours / m_floor:.2f} | torch imported at first page: {any(torch_seen)} |")
    print(f"runs: ours {[round(t, 2) for t in ours]}, minimal {[round(t, 2) for t in floor]}")


if __name__ == "__main__":
    main()
