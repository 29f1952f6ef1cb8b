"""The queue panel: every job of every session in run order, the running job's progress (step,
total, ETA, expert) with a latent preview, and the buttons to reorder, remove and abort.

The panel is refreshed by a timer; the queue itself lives in :class:`wan.app.jobqueue.JobQueue`
(one worker for all sessions, saved to disk after every change).

Whatever a job holds (a label with a lone surrogate, a huge prompt, fields of odd types from an
edited queue file), the panel renders: every text goes through ``printable`` and is cut short, and
a job that still cannot be shown gets a row saying so. One bad job never breaks the page.

On a shared server (``state.shared``) a session sees the others' jobs only as "another session's
job" (no label, error or preview), and may move, remove or abort only its own.
"""

from __future__ import annotations

import logging
import time

import gradio as gr

from wan.app.downloads import DOWNLOAD_KEY, is_download
from wan.app.jobs import printable
from wan.app.state import API_SESSION, AppState

log = logging.getLogger(__name__)

HEADERS = ["#", "job", "status", "what", "progress", "queued by"]
STATUS_MARK = {"queued": "⏳ queued", "running": "▶ running", "done": "✓ done", "failed": "✗ failed",
               "cancelled": "⊘ cancelled"}
HIDDEN = "another session's job"
MAX_LABEL_CHARS = 120
MAX_ERROR_CHARS = 300
MAX_ID_CHARS = 64


def is_own(job, session: str | None) -> bool:
    """Whether ``session`` queued ``job`` (never true for the API's session or an empty one: a
    browser cannot claim them by naming them)."""
    return bool(session) and session != API_SESSION and job.session == session


def hidden(job, session: str | None, shared: bool) -> bool:
    """Whether this session must not see what ``job`` asks for (another session's, on a shared server)."""
    return shared and not is_own(job, session)


def progress_text(job, hide: bool = False) -> str:
    p = job.progress
    if job.status != "running":
        return "" if hide else printable(job.error or "", MAX_ERROR_CHARS)
    if p is None:
        return "starting..." if is_download(job.request) else "loading models..."
    if p.expert == DOWNLOAD_KEY:  # a model download: megabytes
        return printable(f"{p.step / 1000:.2f} of {p.total / 1000:.2f} GB · ETA {p.eta_s:.0f} s", MAX_ERROR_CHARS)
    expert = f" · {p.expert.replace('_', '-')} expert" if p.expert not in ("", "transformer") else ""
    return printable(f"step {p.step}/{p.total}{expert} · ETA {p.eta_s:.0f} s", MAX_ERROR_CHARS)


def label_of(job, session: str | None = None, shared: bool = False) -> str:
    return HIDDEN if hidden(job, session, shared) else printable(job.label, MAX_LABEL_CHARS)


def table(jobs: list, session: str, shared: bool = False) -> list[list]:
    rows = []
    for i, job in enumerate(jobs):
        try:
            who = "you" if is_own(job, session) else ("API" if job.session == API_SESSION else "another session")
            rows.append([i + 1, printable(job.id, MAX_ID_CHARS), printable(STATUS_MARK.get(job.status, job.status), 20),
                         label_of(job, session, shared), progress_text(job, hidden(job, session, shared)), who])
        except Exception:  # noqa: BLE001 - one job must never break the page for everyone
            rows.append([i + 1, _id_of(job), "?", "(this job cannot be shown)", "", "?"])
    return rows


def pickable(jobs: list, session: str | None = None, shared: bool = False) -> list[tuple[str, str]]:
    """(shown text, job id) for the picker; a job whose id cannot travel to the page is left out."""
    choices = []
    for j in jobs:
        try:
            if isinstance(j.id, str) and printable(j.id, MAX_ID_CHARS) == j.id:
                choices.append((f"{j.id} · {label_of(j, session, shared)}", j.id))
        except Exception:  # noqa: BLE001 - as in table()
            continue
    return choices


def running_view(state: AppState, jobs: list, session: str | None = None, shared: bool = False) -> tuple[str, object]:
    job = next((j for j in jobs if j.status == "running"), None)
    if job is None:
        waiting = sum(1 for j in jobs if j.status == "queued")
        return (f"Idle. {waiting} job(s) waiting." if waiting else "Idle: the queue is empty."), None
    hide = hidden(job, session, shared)
    try:
        started = f" · running for {time.time() - job.started:.0f} s" if job.started else ""
        text = f"**{label_of(job, session, shared)}** ({_id_of(job)}): {progress_text(job, hide)}{started}"
    except Exception:  # noqa: BLE001 - as in table()
        text = f"A job is running ({_id_of(job)})."
    return text, None if hide else state.preview_of(job.id)


def _id_of(job) -> str:
    return printable(getattr(job, "id", "?"), MAX_ID_CHARS)


def render() -> dict:
    ui = {}
    ui["status"] = gr.Markdown("Idle: the queue is empty.", elem_id="queue-status")
    ui["preview"] = gr.Image(label="Latent preview", interactive=False, height=160, elem_id="preview",
                             show_label=True)
    ui["table"] = gr.Dataframe(headers=HEADERS, value=[], interactive=False, wrap=True, elem_id="queue-table")
    with gr.Row():
        ui["pick"] = gr.Dropdown([], label="Job", elem_id="job-pick", scale=3)
        ui["up"] = gr.Button("Move up", elem_id="job-up", scale=1)
        ui["down"] = gr.Button("Move down", elem_id="job-down", scale=1)
        ui["remove"] = gr.Button("Remove", elem_id="job-remove", scale=1)
        ui["abort"] = gr.Button("Abort running job", variant="stop", elem_id="abort", scale=1)
    ui["message"] = gr.Markdown("", elem_id="queue-message")
    ui["shown"] = gr.State(None)  # the picker's choices as last sent to this session
    return ui


def views(state: AppState, session: str, picked: str | None, shown: list | None = None,
          jobs: list | None = None) -> list:
    """[status, preview, table, pick, shown choices] as updates (the order of ``outputs(ui)``),
    all from one snapshot of the queue (``jobs``, taken here if not given).

    The job picker is left alone when its choices have not changed since they were last sent
    (``shown``, kept in a per-session state), so a timer refresh never closes it under the
    user's pointer. Never raises: whatever the jobs hold, the page still refreshes."""
    try:
        jobs = state.queue.jobs() if jobs is None else jobs
        shared = bool(getattr(state, "shared", False))
        text, preview = running_view(state, jobs, session, shared)
        choices = [list(c) for c in pickable(jobs, session, shared)]
        if shown is not None and choices == [list(c) for c in shown]:
            pick = gr.update()
        else:
            keep = picked if isinstance(picked, str) and picked in {v for _, v in choices} else None
            pick = gr.update(choices=[tuple(c) for c in choices], value=keep)
        return [text, preview, table(jobs, session, shared), pick, choices]
    except Exception:  # noqa: BLE001 - a bug here must not take the page down: say so, leave the rest
        log.exception("the queue panel could not be refreshed")
        return ["⚠️ The queue cannot be shown right now; see the server log.", None, gr.update(), gr.update(),
                shown]


def outputs(ui: dict) -> list:
    return [ui["status"], ui["preview"], ui["table"], ui["pick"], ui["shown"]]


def perform(state: AppState, what: str, job_id, session_id) -> str:
    """Does one queue action ("up", "down", "remove", "abort") for a session; returns the message.

    On a shared server the queue checks, under its lock, that the job is the session's own (a
    session that has no id yet, or names the API's, owns nothing)."""
    owner = None
    try:
        if not isinstance(job_id, str) or not job_id:
            job_id = None
        if state.shared:
            if not isinstance(session_id, str) or not session_id or session_id == API_SESSION:
                raise ValueError("this page has no session yet; reload it")
            owner = session_id
        if what == "abort":
            # the picked job when it is still waiting or running, else the one running: never
            # a job that merely started since the click was aimed at another
            picked = state.queue.get(job_id) if job_id else None
            target = picked if picked is not None and picked.status in ("queued", "running") else None
            target = target or state.queue.running()
            if target is None:
                raise ValueError("no job is running")
            state.queue.abort(target.id, owner=owner)
            return f"Aborting {target.id}..."
        if not job_id:
            raise ValueError("pick a job first")
        if what == "remove":
            state.queue.remove(job_id, owner=owner)
            return f"Removed {job_id}."
        state.queue.move(job_id, -1 if what == "up" else 1, owner=owner)
        return f"Moved {job_id} {what}."
    except ValueError as e:
        return f"⚠️ {printable(e, MAX_ERROR_CHARS)}"
    except Exception:  # noqa: BLE001 - a bug: logged with its traceback, the page goes on
        log.exception("queue action %s on job %s failed", what, printable(job_id, MAX_ID_CHARS))
        return "⚠️ that did not work; see the server log"


def listen(state: AppState, ui: dict, session) -> None:
    def act(what, job_id, session_id, shown):
        msg = perform(state, what, job_id, session_id)
        return [msg, *views(state, session_id, job_id, shown)]
    for what in ("up", "down", "remove", "abort"):
        ui[what].click(lambda j, s, shown, w=what: act(w, j, s, shown), [ui["pick"], session, ui["shown"]],
                       [ui["message"], *outputs(ui)])
