"""The queue panel: every job of every session in run order, the running job's progress (step,
total, ETA, expert) with a latent preview, and the buttons to reorder, remove and abort.

The panel is refreshed by a timer; the queue itself lives in :class:`wan.app.jobqueue.JobQueue`
(one worker for all sessions, saved to disk after every change).
"""

from __future__ import annotations

import time

import gradio as gr

from wan.app.state import AppState

HEADERS = ["#", "job", "status", "what", "progress", "queued by"]
STATUS_MARK = {"queued": "⏳ queued", "running": "▶ running", "done": "✓ done", "failed": "✗ failed",
               "cancelled": "⊘ cancelled"}


def progress_text(job) -> str:
    p = job.progress
    if job.status != "running":
        return job.error or ""
    if p is None:
        return "loading models..."
    expert = f" · {p.expert.replace('_', '-')} expert" if p.expert not in ("", "transformer") else ""
    return f"step {p.step}/{p.total}{expert} · ETA {p.eta_s:.0f} s"


def table(jobs: list, session: str) -> list[list]:
    rows = []
    for i, job in enumerate(jobs):
        who = "you" if job.session == session else ("API" if job.session == "api" else "another session")
        rows.append([i + 1, job.id, STATUS_MARK.get(job.status, job.status), job.label, progress_text(job), who])
    return rows


def pickable(jobs: list) -> list[tuple[str, str]]:
    return [(f"{j.id} · {j.label}", j.id) for j in jobs]


def running_view(state: AppState, jobs: list) -> tuple[str, object]:
    job = next((j for j in jobs if j.status == "running"), None)
    if job is None:
        waiting = sum(1 for j in jobs if j.status == "queued")
        return (f"Idle. {waiting} job(s) waiting." if waiting else "Idle: the queue is empty."), None
    started = f" · running for {time.time() - job.started:.0f} s" if job.started else ""
    return f"**{job.label}** ({job.id}): {progress_text(job)}{started}", state.preview_of(job.id)


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
    user's pointer."""
    jobs = state.queue.jobs() if jobs is None else jobs
    text, preview = running_view(state, jobs)
    choices = [list(c) for c in pickable(jobs)]
    if shown is not None and choices == [list(c) for c in shown]:
        pick = gr.update()
    else:
        pick = gr.update(choices=[tuple(c) for c in choices],
                         value=picked if picked in {v for _, v in choices} else None)
    return [text, preview, table(jobs, session), pick, choices]


def outputs(ui: dict) -> list:
    return [ui["status"], ui["preview"], ui["table"], ui["pick"], ui["shown"]]


def listen(state: AppState, ui: dict, session) -> None:
    def act(what, job_id, session_id, shown):
        try:
            if what == "abort":
                # the picked job when it is still waiting or running, else the one running: never
                # a job that merely started since the click was aimed at another
                picked = state.queue.get(job_id) if job_id else None
                target = picked if picked is not None and picked.status in ("queued", "running") else None
                target = target or state.queue.running()
                if target is None:
                    raise ValueError("no job is running")
                state.queue.abort(target.id)
                msg = f"Aborting {target.id}..."
            elif not job_id:
                raise ValueError("pick a job first")
            elif what == "remove":
                state.queue.remove(job_id)
                msg = f"Removed {job_id}."
            else:
                state.queue.move(job_id, -1 if what == "up" else 1)
                msg = f"Moved {job_id} {what}."
        except ValueError as e:
            msg = f"⚠️ {e}"
        return [msg, *views(state, session_id, job_id, shown)]
    for what in ("up", "down", "remove", "abort"):
        ui[what].click(lambda j, s, shown, w=what: act(w, j, s, shown), [ui["pick"], session, ui["shown"]],
                       [ui["message"], *outputs(ui)])
