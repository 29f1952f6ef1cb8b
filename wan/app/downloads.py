"""Downloading a model that is not ready, from the page: what it needs and where, then a queue job
that fetches it with its progress in the queue panel.

A download is a job of the ordinary queue (one worker: a download never competes with a generation
for the disk or the network), whose request is ``{"download": <model id>}``. Before it is queued, the
free disk space is checked against the missing bytes. The Hub client resumes a partial file on the
next try, so a cancelled or failed download loses nothing; ``HF_TOKEN`` is used for gated repos.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

from wan.app.jobs import Job, RunOutcome

DOWNLOAD_KEY = "download"
MB = 10**6


def is_download(request: dict) -> bool:
    """Whether a queue job's request is a download (not a generation)."""
    return isinstance(request, dict) and set(request) == {DOWNLOAD_KEY}


def _gb(n: int, estimated: bool = False) -> str:
    return f"{'~' if estimated else ''}{n / 1e9:.1f} GB"


def readiness_text(state, model_id: str) -> str:
    """Markdown under the model picker: the files of a ready model and where they come from, or what
    is missing (each file's size and where it goes), the free disk space and the ways to get them."""
    from wan.registry import RegistryError, get_model
    try:
        spec = get_model(model_id)
        ready = state.readiness(spec, estimate=True)
    except RegistryError as e:
        return f"⚠️ {e}"
    if ready.ready:
        where = {"found": "your models folder", "checkpoints": "checkpoints", "generated": "made on first use"}
        return "✓ Ready: " + "; ".join(f"{c.role} ({where[c.source]}: `{c.path}`)" for c in ready.components)
    estimated = any(c.estimated for c in ready.missing)
    lines = [f"⬇ **Not on this machine.** Missing, {_gb(ready.missing_bytes, estimated)} in all:"]
    for c in ready.missing:
        size = f" ({_gb(c.missing_bytes, c.estimated)})" if c.missing_bytes else ""
        lines.append(f"- {c.role}{size}: `{c.path}`")
    problem = _disk_problem(state, ready)
    lines.append(f"\n⚠️ {problem}" if problem else f"\nFree disk space there: {_gb(_free(state))}.")
    token = "set" if os.environ.get("HF_TOKEN") else "not set (needed only for gated repos)"
    lines.append(f"Download them here (progress in the queue), run `python wgp.py download {spec.id}`, or put "
                 f"the files in a models folder (Settings: models_dir). HF_TOKEN is {token}.")
    return "\n".join(lines)


def queue_download(state, model_id: str, session: str) -> Job:
    """Queues the download of ``model_id``'s missing files for ``session``.

    Raises:
        ValueError: unknown model, nothing to download, or not enough free disk space (in words).
    """
    from wan.registry import RegistryError, get_model
    try:
        spec = get_model(model_id)
    except RegistryError as e:
        raise ValueError(f"model: {e}") from None
    ready = state.readiness(spec, estimate=True)
    if ready.ready:
        raise ValueError(f"{spec.display_name} is ready on this machine: nothing to download")
    problem = _disk_problem(state, ready)
    if problem:
        raise ValueError(problem)
    label = f"download: {spec.display_name} ({_gb(ready.missing_bytes, any(c.estimated for c in ready.missing))})"
    return state.queue.add({DOWNLOAD_KEY: spec.id}, session, label=label)


def run_download(state, job: Job, progress, cancel) -> RunOutcome:
    """The queue's runner for a download job: fetches the missing files, reporting megabytes done
    and total as the job's progress; cancelling stops between chunks (the next try resumes)."""
    from wan.engine.loop import Cancelled
    from wan.loading.download import DownloadCancelled, ensure_files
    from wan.registry import get_model
    spec = get_model(job.request[DOWNLOAD_KEY])
    ready = state.readiness(spec, estimate=True)
    roles = sorted({c.role for c in ready.missing})
    total, start = max(ready.missing_bytes, 1), time.monotonic()

    def on_bytes(done: int) -> None:
        elapsed = time.monotonic() - start
        eta = elapsed * (total - done) / done if 0 < done < total else 0.0
        progress(SimpleNamespace(step=done // MB, total=max(total, done) // MB, expert=DOWNLOAD_KEY,
                                 eta=eta, elapsed=elapsed))
    if roles:
        try:
            ensure_files(spec, state.settings.checkpoint_dir, components=roles, progress=False,
                         on_bytes=on_bytes, cancelled=lambda: cancel.cancelled)
        except DownloadCancelled as e:
            raise Cancelled(str(e)) from None
    return RunOutcome([], [f"{spec.display_name} is ready: {', '.join(roles) or 'nothing was missing'}"])


def _free(state) -> int:
    from wan.loading.download import free_bytes
    return free_bytes(state.settings.checkpoint_dir)


def _disk_problem(state, ready) -> str | None:
    from wan.loading.download import free_space_problem
    return free_space_problem(state.settings.checkpoint_dir, ready.missing_bytes)
