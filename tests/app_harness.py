"""Starting the real studio server in a subprocess and driving it from tests.

``StudioServer`` runs ``python wgp.py`` on the TEST model family with its own folders under a
temporary directory and a free port; ``browser()`` launches Debian's Chromium through Playwright
(``scripts/setup.sh --test`` installs both). A missing Chromium fails the browser tests with the
reason: it is never a silent skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("WAN_STUDIO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StudioServer:
    """One ``wgp.py serve`` process; ``base`` holds its checkpoints, outputs, LoRAs and state."""

    def __init__(self, base: Path, checkpoints: Path, *extra: str, port: int | None = None, gated: bool = False):
        self.base = Path(base)
        # gated: run tests/gated_wgp.py, where a "[hold]" job waits while the file self.gate exists
        self.gated = gated
        self.gate = self.base / "hold"
        self.checkpoints = Path(checkpoints)
        self.output_dir = self.base / "outputs"
        self.lora_dir = self.base / "loras"
        self.state_dir = self.base / "state"
        self.port = port or free_port()
        self.extra = list(extra)
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def command(self) -> list[str]:
        entry = ROOT / "tests" / "gated_wgp.py" if self.gated else ROOT / "wgp.py"
        return [sys.executable, str(entry), "serve", "--server-port", str(self.port),
                "--model", "test-tiny-t2v", "--checkpoint-dir", str(self.checkpoints), "--output-dir",
                str(self.output_dir), "--lora-dir", str(self.lora_dir), "--state-dir", str(self.state_dir),
                "--config", str(self.base / "wan_studio.yaml"), *self.extra]

    def start(self, timeout: float = 120) -> "StudioServer":
        """Starts the server and waits until it serves. gradio gives up at start when its own request to
        the page does not answer in time (a machine under heavy load): that start is tried once more."""
        try:
            return self._start(timeout)
        except AssertionError as e:
            if "When localhost is not accessible" not in str(e):
                raise
            self.lines.clear()
            return self._start(timeout)

    def _start(self, timeout: float) -> "StudioServer":
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "wan_studio.yaml").touch()
        env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "WAN_TEST_GATE": str(self.gate)}
        self.proc = subprocess.Popen(self.command(), cwd=self.base, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any("serving at" in line for line in self.lines):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError("the server did not start:\n" + "".join(self.lines[-40:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return "".join(self.lines)


def api_client(server: StudioServer):
    """A ``gradio_client`` of the server's API, quiet and without analytics."""
    from gradio_client import Client
    return Client(server.url, verbose=False, analytics_enabled=False)


def launch_chromium(playwright):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `bash scripts/setup.sh --test` (installs Debian's "
                    "chromium) or set WAN_STUDIO_CHROMIUM")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


# -- gradio page helpers -------------------------------------------------------------------------

def open_studio(context, url: str):
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("#prompt textarea")
    # the load event fills the task list; wait for it so later choices are not reset
    page.wait_for_function("() => document.querySelector('#task input') && document.querySelector('#task input').value")
    return page


def choose(page, elem_id: str, option: str) -> None:
    """Picks ``option`` in a gradio dropdown."""
    page.click(f"#{elem_id} input")
    page.get_by_role("option", name=option, exact=True).first.click()
    page.keyboard.press("Escape")


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")


def add_job(page, prompt: str | None = None) -> str:
    """Clicks "Add to queue" and returns the new message (``Queued 1 job: <id>`` or the error)."""
    if prompt is not None:
        page.fill("#prompt textarea", prompt)
    before = page.inner_text("#message")
    page.get_by_role("button", name="Add to queue", exact=True).click()
    page.wait_for_function("(before) => { const t = document.querySelector('#message').innerText.trim();"
                           " return (t.startsWith('Queued') || t.startsWith('⚠️')) && t !== before.trim(); }",
                           arg=before)
    return page.inner_text("#message").strip()


def job_id_of(message: str) -> str:
    assert message.startswith("Queued"), message
    return message.rsplit(":", 1)[1].strip().split(",")[0].strip()


def queue_text(page) -> str:
    return page.inner_text("#queue-table")


def wait_for_status(page, job_id: str, status: str, timeout_ms: int = 120_000) -> None:
    page.wait_for_function(
        """([id, status]) => [...document.querySelectorAll('#queue-table [role=row]')]
             .some(r => r.innerText.includes(id) && r.innerText.includes(status))""",
        arg=[job_id, status], timeout=timeout_ms)


def gallery_count(page) -> int:
    return page.locator("#gallery video, #gallery img").count()
