"""The queue panel: every job of every session in run order, the running job's progress (step,
total, ETA, expert) with a latent preview, the picked job's details (times, its whole error,
notices, files), and the buttons to reorder, remove, cancel, clear and abort.

The panel is refreshed by a timer; the queue itself lives in :class:`wan.app.jobqueue.JobQueue`
(one worker for all sessions, saved to disk after every change). With GPU workers (``--gpus``) a
running job's progress starts with where it runs ("GPUs 0,1", "GPU 2", "CPU ×2"), its details say
where it ran, and several jobs may run at once (``--gpu_mode per_job``): the status line lists each.

Whatever a job holds (a label with a lone surrogate, a huge prompt, fields of odd types from an
edited queue file), the panel renders: every text goes through ``printable`` and is cut short, and
a job that still cannot be shown gets a row saying so. One bad job never breaks the page.

On a shared server (``state.shared``) a session sees the others' jobs only as "another session's
job" (no label, error, files or preview), and may move, remove, cancel or abort only its own.

Every event of this panel, and the page's timer, is wired with :data:`QUIET`: gradio would
otherwise draw its progress timer ("0.1s") over the panel each second.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path

import gradio as gr

from wan.app.downloads import DOWNLOAD_KEY, is_download
from wan.app.jobs import first_line, placement_text, printable, printable_lines
from wan.app.train_request import TRAIN_PHASES, is_training, progress_words
from wan.app.state import API_SESSION, AppState

log = logging.getLogger(__name__)

HEADERS = ["#", "job", "status", "what", "progress", "queued by"]
COLUMN_WIDTHS = ["5%", "20%", "18%", "27%", "20%", "10%"]  # the status and most of the id always show
# plain words with symbols that every common font has (DejaVu Sans among them): Debian's Chromium
# has no emoji font, and "⏳" showed as a box there
STATUS_MARK = {"queued": "queued", "running": "▶ running", "done": "✓ done", "failed": "✗ failed",
               "cancelled": "■ cancelled"}
MARK_SYMBOLS = "▶✓✗■…·"  # the only characters beyond ASCII that the table's marks may use
HIDDEN = "another session's job"
PICK_HINT = "Pick a job above to see its details: times, the whole error, notices and files."
MAX_LABEL_CHARS = 120
MAX_TABLE_CHARS = 60  # a table cell stays one line high: the details show the rest
MAX_ERROR_CHARS = 300
MAX_DETAIL_ERROR_CHARS = 4000
MAX_DETAIL_ITEMS = 20
MAX_ID_CHARS = 64
# the progress animation nowhere: "hidden" alone still puts the timer text in the output's status
# box (transparent, yet there for screen readers and innerText); no target at all draws none
QUIET = {"show_progress": "hidden", "show_progress_on": []}
ACTIONS = ("up", "down", "remove", "cancel", "clear", "abort")


def is_own(job, session: str | None) -> bool:
    """Whether ``session`` queued ``job`` (never true for the API's session or an empty one: a
    browser cannot claim them by naming them)."""
    return bool(session) and session != API_SESSION and job.session == session


def hidden(job, session: str | None, shared: bool) -> bool:
    """Whether this session must not see what ``job`` asks for (another session's, on a shared server)."""
    return shared and not is_own(job, session)


def where_text(job) -> str:
    """Where the job runs or ran ("GPUs 0,1", "GPU 2", "CPU ×2"); "" in the server process."""
    return placement_text(getattr(job, "gpus", None))


def progress_text(job, hide: bool = False) -> str:
    """The table's progress cell: the step and ETA of a running job (after where it runs, on GPU
    workers), the first line of a failed job's error (the details show all of it), one line in
    every case."""
    if job.status != "running":
        return "" if hide or not job.error else first_line(job.error, MAX_TABLE_CHARS)
    where = where_text(job)
    text = _running_progress(job)
    return printable(f"{where} · {text}", MAX_ERROR_CHARS) if where else text


def _running_progress(job) -> str:
    p = job.progress
    if p is None:
        return "starting..." if is_download(job.request) or is_training(job.request) else "loading models..."
    if p.expert in TRAIN_PHASES and is_training(job.request):  # a training run (the Train tab)
        return printable(progress_words(p), MAX_ERROR_CHARS)
    if p.expert == DOWNLOAD_KEY:  # a model download: megabytes
        return printable(f"{p.step / 1000:.2f} of {p.total / 1000:.2f} GB · ETA {p.eta_s:.0f} s", MAX_ERROR_CHARS)
    expert = f" · {p.expert.replace('_', '-')} expert" if p.expert not in ("", "transformer") else ""
    window = f"window {p.window}/{p.windows} · " if p.windows > 1 else ""
    return printable(f"{window}step {p.step}/{p.total}{expert} · ETA {p.eta_s:.0f} s", MAX_ERROR_CHARS)


def label_of(job, session: str | None = None, shared: bool = False, limit: int = MAX_LABEL_CHARS) -> str:
    return HIDDEN if hidden(job, session, shared) else printable(job.label, limit)


def mark_of(job) -> str:
    return printable(STATUS_MARK.get(job.status, job.status), 20)


def table(jobs: list, session: str, shared: bool = False) -> list[list]:
    """The rows of the queue table, each cell one short line."""
    rows = []
    for i, job in enumerate(jobs):
        try:
            who = "you" if is_own(job, session) else ("API" if job.session == API_SESSION else "another session")
            rows.append([i + 1, printable(job.id, MAX_ID_CHARS), mark_of(job),
                         label_of(job, session, shared, MAX_TABLE_CHARS),
                         progress_text(job, hidden(job, session, shared)), who])
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
    """The status line (a line per running job: several run at once on per-job GPU workers) and
    the latent preview of the first running job this session may see."""
    running = [j for j in jobs if j.status == "running"]
    if not running:
        waiting = sum(1 for j in jobs if j.status == "queued")
        return (f"Idle. {waiting} job(s) waiting." if waiting else "Idle: the queue is empty."), None
    lines, preview = [], None
    for job in running:
        hide = hidden(job, session, shared)
        try:
            started = f" · running for {time.time() - job.started:.0f} s" if job.started else ""
            lines.append(f"**{label_of(job, session, shared)}** ({_id_of(job)}): {progress_text(job, hide)}{started}")
        except Exception:  # noqa: BLE001 - as in table()
            lines.append(f"A job is running ({_id_of(job)}).")
        if preview is None and not hide:
            preview = state.preview_of(job.id)
    return "  \n".join(lines), preview


def _id_of(job) -> str:
    return printable(getattr(job, "id", "?"), MAX_ID_CHARS)


# -- the picked job's details ---------------------------------------------------------------------

def _md(text, limit: int | None = None) -> str:
    """``text`` on one line with Markdown's special characters escaped, so a label or file name is
    shown as it is, never as markup (the boxes showing it render no LaTeX either)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-=.!|<>~&$])", r"\\\1", printable(text, limit))


def _lines(text, limit: int) -> str:
    """``text`` as Markdown that shows each of its lines on a line of its own (a hard break after
    each; a long line wraps in the box, never scrolls out of it), its indentation kept (as
    no-break spaces) and nothing in it read as markup."""
    out = []
    for line in printable_lines(text, limit).split("\n"):
        body = line.lstrip(" ")
        out.append("\u00a0" * (len(line) - len(body)) + _md(body))
    return "  \n".join(out)


def _when(seconds) -> str | None:
    """A time of the job as local date and time, or None when there is none (or it is odd)."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds) or seconds <= 0:
        return None
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    except (OverflowError, OSError, ValueError):
        return None


def _times(job) -> str:
    """``queued ... · started ... · finished ... (took N s)`` as far as the job has them."""
    parts = [f"{what} {when}" for what, when in (("queued", _when(job.created)), ("started", _when(job.started)),
                                                  ("finished", _when(job.finished))) if when]
    if _when(job.started) and _when(job.finished):
        parts[-1] += f" (took {max(job.finished - job.started, 0):.0f} s)"
    return " · ".join(parts)


def _listed(title: str, items, name_only: bool = False) -> list[str]:
    items = [i for i in items if isinstance(i, str)] if isinstance(items, list) else []
    if not items:
        return []
    shown = [Path(i).name if name_only else i for i in items[:MAX_DETAIL_ITEMS]]
    more = [f"- and {len(items) - MAX_DETAIL_ITEMS} more"] if len(items) > MAX_DETAIL_ITEMS else []
    return [f"**{title}**", "\n".join([f"- {_md(i, 300)}" for i in shown] + more)]


def job_detail(job, session: str | None, shared: bool) -> str:
    """The details of one job as Markdown: label and id, status and times, then (for a job this
    session may see) the whole error on its own lines, the notices and the files' names."""
    head = f"**{_md(label_of(job, session, shared))}** · job {_md(job.id, MAX_ID_CHARS)}"
    where = where_text(job)
    where = f"on {where}" if where else ""
    status = " · ".join(p for p in (_md(mark_of(job)), _md(where), _times(job)) if p)
    blocks = [head, status]
    if not hidden(job, session, shared):
        if job.status == "running":
            blocks.append(_md(progress_text(job)))
        if job.error:
            blocks += ["**Error**", _lines(job.error, MAX_DETAIL_ERROR_CHARS)]
        blocks += _listed("Notices", job.notices) + _listed("Files", job.files, name_only=True)
    return "\n\n".join(blocks)


def detail_text(state: AppState, session: str | None, picked, jobs: list | None = None) -> str:
    """The job detail box for the picked job id (from ``jobs``, a snapshot, taken here if not
    given). Never raises."""
    try:
        if not isinstance(picked, str) or not picked:
            return PICK_HINT
        jobs = state.queue.jobs() if jobs is None else jobs
        job = next((j for j in jobs if j.id == picked), None)
        if job is None:  # removed: the picker is cleared in the same refresh
            return PICK_HINT
        return job_detail(job, session, bool(getattr(state, "shared", False)))
    except Exception:  # noqa: BLE001 - as in views()
        log.exception("the details of job %s cannot be shown", printable(picked, MAX_ID_CHARS))
        return "⚠️ The details of this job cannot be shown; see the server log."


def detail_update(state: AppState, session: str | None, picked, now=None, jobs: list | None = None):
    """The detail box's new text, or ``gr.update()`` when it shows that already (``now``): a box
    sent again every second would lose the text a person is selecting to copy."""
    text = detail_text(state, session, picked, jobs)
    return gr.update() if text == now else text


# -- a job's outcome, for the message by the Add button -----------------------------------------

def job_outcome_text(state: AppState, job_id, session: str | None, jobs: list | None = None) -> str | None:
    """How job ``job_id`` ended, as a message for the page (a failure with its whole error, on its
    own lines); None while it waits or runs, when it is unknown, or when this session may not see
    it (another session's, on a shared server). Never raises."""
    try:
        jobs = state.queue.jobs() if jobs is None else jobs
        job = next((j for j in jobs if j.id == job_id), None)
        if job is None or job.status not in STATUS_MARK or job.status in ("queued", "running"):
            return None
        if hidden(job, session, bool(getattr(state, "shared", False))):
            return None
        name = _md(job.id, MAX_ID_CHARS)
        if job.status == "failed":
            error = _lines(job.error or "no reason was recorded", MAX_DETAIL_ERROR_CHARS)
            return f"⚠️ Job {name} failed:  \n{error}"
        if job.status == "cancelled":
            return f"Job {name} was cancelled."
        return f"Job {name} is done: {len(job.files)} file(s), shown in the gallery."
    except Exception:  # noqa: BLE001 - the page refresh calls this every second
        log.exception("the outcome of job %s cannot be shown", printable(job_id, MAX_ID_CHARS))
        return None


def _names(text: str, job_id) -> bool:
    """Whether ``text`` names the job id as a word of its own."""
    return isinstance(job_id, str) and bool(job_id) and re.search(
        rf"(?<![0-9A-Za-z]){re.escape(job_id)}(?![0-9A-Za-z])", text) is not None


def failure_notice(state: AppState, session: str | None, message_now, jobs: list | None = None) -> str | None:
    """The new text of the message by the Add button when a job it names (``Queued 1 job: <id>``)
    has failed: ``⚠️ Job <id> failed:`` and the whole error (the newest such job of this session).
    None when there is nothing new to say: no job of the message failed, or the message says it
    already. Never raises."""
    try:
        if not isinstance(message_now, str) or not message_now or not session:
            return None
        jobs = state.queue.jobs() if jobs is None else jobs
        failed = [j for j in jobs if j.status == "failed" and is_own(j, session) and _names(message_now, j.id)]
        if not failed:
            return None
        newest = max(failed, key=lambda j: j.created if isinstance(j.created, (int, float)) else 0)
        text = job_outcome_text(state, newest.id, session, jobs)
        return None if text is None or text == message_now else text
    except Exception:  # noqa: BLE001 - as in job_outcome_text()
        log.exception("the message by the Add button cannot be updated")
        return None


# -- the panel -----------------------------------------------------------------------------------

def render() -> dict:
    ui = {}
    # no LaTeX in the panel's texts: a prompt with "$$" in it is text
    ui["status"] = gr.Markdown("Idle: the queue is empty.", elem_id="queue-status", latex_delimiters=[])
    ui["preview"] = gr.Image(label="Latent preview", interactive=False, height=160, elem_id="preview",
                             show_label=True)
    # one line a row, and as wide as the panel: cells are cut short, the details show everything
    ui["table"] = gr.Dataframe(headers=HEADERS, value=[], interactive=False, wrap=False, elem_id="queue-table",
                               column_widths=COLUMN_WIDTHS)
    # allow_custom_value: a value the page sends from before the choices changed (a timer refresh
    # racing a Remove) is checked here, never refused by gradio with an error in the server log
    ui["pick"] = gr.Dropdown([], label="Job", elem_id="job-pick", allow_custom_value=True)
    with gr.Row():
        ui["up"] = gr.Button("Move up", elem_id="job-up", size="sm", min_width=100)
        ui["down"] = gr.Button("Move down", elem_id="job-down", size="sm", min_width=100)
        ui["cancel"] = gr.Button("Cancel selected", elem_id="cancel-selected", size="sm", min_width=100)
    with gr.Row():
        ui["remove"] = gr.Button("Remove", elem_id="job-remove", size="sm", min_width=100)
        ui["clear"] = gr.Button("Clear finished", elem_id="clear-finished", size="sm", min_width=100)
        ui["abort"] = gr.Button("Abort running", variant="stop", elem_id="abort", size="sm", min_width=100)
    ui["message"] = gr.Markdown("", elem_id="queue-message", latex_delimiters=[])
    ui["detail"] = gr.Markdown(PICK_HINT, elem_id="job-detail", latex_delimiters=[])
    ui["shown"] = gr.State(None)  # the picker's choices as last sent to this session
    return ui


def pick_update(picked, choices: list, shown: list | None):
    """The picker's update: its choices only when they changed since last sent (``shown``), so a
    refresh never closes it under the pointer; its value cleared in the same update whenever the
    picked job is no longer a choice, and otherwise left to the page (a value sent from here could
    undo a pick made since). Never a value that is not among the choices."""
    valid = isinstance(picked, str) and picked in {v for _, v in choices}
    if shown is not None and choices == [list(c) for c in shown]:
        return gr.update() if valid or not picked else gr.update(value=None)
    if valid:
        return gr.update(choices=[tuple(c) for c in choices])
    return gr.update(choices=[tuple(c) for c in choices], value=None)


def views(state: AppState, session: str, picked: str | None, shown: list | None = None,
          jobs: list | None = None) -> list:
    """[status, preview, table, pick, shown choices] as updates (the order of ``outputs(ui)``),
    all from one snapshot of the queue (``jobs``, taken here if not given).

    The job picker is left alone when its choices have not changed since they were last sent
    (``shown``, kept in a per-session state), see :func:`pick_update`. Never raises: whatever
    the jobs hold, the page still refreshes."""
    try:
        jobs = state.queue.jobs() if jobs is None else jobs
        shared = bool(getattr(state, "shared", False))
        text, preview = running_view(state, jobs, session, shared)
        choices = [list(c) for c in pickable(jobs, session, shared)]
        return [text, preview, table(jobs, session, shared), pick_update(picked, choices, shown), choices]
    except Exception:  # noqa: BLE001 - a bug here must not take the page down: say so, leave the rest
        log.exception("the queue panel could not be refreshed")
        return ["⚠️ The queue cannot be shown right now; see the server log.", None, gr.update(), gr.update(),
                shown]


def outputs(ui: dict) -> list:
    return [ui["status"], ui["preview"], ui["table"], ui["pick"], ui["shown"]]


def _abort_running(state: AppState, owner: str | None, picked: str | None = None) -> str:
    """Aborts the picked job if it runs, else the job that runs now (the first to start, when
    several run on GPU workers); on a shared server only one's own."""
    target = next((j for j in state.queue.running_jobs() if j.id == picked), None) or state.queue.running()
    if target is None:
        raise ValueError("no job is running")
    # by id: a job that finished since is not aborted, nor one that started in its place
    if not state.queue.abort(target.id, owner=owner):
        raise ValueError(f"job {target.id} finished before it could be aborted")
    return f"Aborting {target.id}..."


def perform(state: AppState, what: str, job_id, session_id) -> str:
    """Does one queue action for a session; returns the message. Actions: "up", "down", "remove"
    and "cancel" (a waiting job, never a running one) act on the picked job; "clear" removes the
    session's finished jobs from the list (their outputs stay in its gallery); "abort" stops the
    running job, whatever is picked.

    On a shared server the queue checks, under its lock, that the job is the session's own (a
    session that has no id yet, or names the API's, owns nothing)."""
    owner = None
    try:
        if not isinstance(job_id, str) or not job_id:
            job_id = None
        has_session = isinstance(session_id, str) and bool(session_id) and session_id != API_SESSION
        if state.shared or what == "clear":
            if not has_session:
                raise ValueError("this page has no session yet; reload it")
            owner = session_id if state.shared else None
        if what == "abort":
            return _abort_running(state, owner, job_id)
        if what == "clear":
            n = state.queue.clear_finished(session_id)
            return (f"Cleared {n} finished job(s) of yours; their outputs stay in the gallery." if n
                    else "None of your jobs has finished: nothing to clear.")
        if not job_id:
            raise ValueError("pick a job first")
        if what == "remove":
            state.queue.remove(job_id, owner=owner)
            return f"Removed {job_id}."
        if what == "cancel":
            state.queue.cancel(job_id, owner=owner)
            return f"Cancelled {job_id}."
        if what not in ("up", "down"):
            raise ValueError(f"{printable(repr(what), 40)} is not a queue action")
        state.queue.move(job_id, -1 if what == "up" else 1, owner=owner)
        return f"Moved {job_id} {what}."
    except ValueError as e:
        text = str(e)
        if "is running; only queued jobs" in text:
            text += '; use "Abort running" to stop it'
        return f"⚠️ {printable(text, MAX_ERROR_CHARS)}"
    except Exception:  # noqa: BLE001 - a bug: logged with its traceback, the page goes on
        log.exception("queue action %s on job %s failed", what, printable(job_id, MAX_ID_CHARS))
        return "⚠️ that did not work; see the server log"


def listen(state: AppState, ui: dict, session) -> None:
    def act(what, job_id, session_id, shown, detail_now):
        msg = perform(state, what, job_id, session_id)
        jobs = state.queue.jobs()
        still = job_id if any(j.id == job_id for j in jobs) else None  # a removed job's pick is cleared
        return [msg, *views(state, session_id, job_id, shown, jobs),
                detail_update(state, session_id, still, detail_now, jobs)]
    for what in ACTIONS:
        ui[what].click(lambda j, s, shown, d, w=what: act(w, j, s, shown, d),
                       [ui["pick"], session, ui["shown"], ui["detail"]],
                       [ui["message"], *outputs(ui), ui["detail"]], **QUIET)
    ui["pick"].change(lambda picked, s, now: detail_update(state, s, picked, now), [ui["pick"], session, ui["detail"]],
                      ui["detail"], **QUIET)
