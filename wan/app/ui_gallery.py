"""Outputs: a gallery of this session's videos and images (or of the whole output folder), the
settings of the selected one, and three ways back into the form: "Load these settings", "Continue
this video" (its settings, with the video itself as the video to continue: the next job's frames
follow it in one file, see ``wan.engine.windows``), or dropping an earlier output file (mp4, png,
or its .json sidecar) onto the app.

Settings come from the metadata every output carries (the resolved request, see
``Engine.metadata``), so an output made weeks ago restores exactly what made it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import gradio as gr

from wan.app.state import AppState

SHOWN_SUFFIXES = (".mp4", ".png", ".jpg", ".webp")
MAX_ITEMS = 200


def session_outputs(state: AppState, session: str, jobs: list | None = None) -> list[str]:
    """Files of this session's done jobs, newest first: those of the jobs listed (``jobs``, a
    queue snapshot) and those the queue keeps for the session after their jobs left the list
    (removed, cleared or past the history: ``JobQueue.kept_outputs``, saved with the queue, so a
    video stays in its gallery across restarts too).

    Only files inside the output folder: a job's list may name any path (an edited queue file,
    an output folder changed since), and gradio refuses to send a file outside the folders it
    serves, which would fail the whole page refresh."""
    from wan.app.security import is_inside
    named: list[str] = []
    for job in state.queue.jobs(session=session) if jobs is None else jobs:
        if job.status == "done" and job.session == session:
            named += job.files
    named += state.queue.kept_outputs(session) if session else []
    found, seen = [], set()
    for f in named:
        if not isinstance(f, str) or f in seen or not f.isprintable() or Path(f).suffix.lower() not in SHOWN_SUFFIXES:
            continue
        seen.add(f)
        try:
            info = os.stat(f)
        except (OSError, ValueError):
            continue  # deleted since, or a name the system refuses
        if stat.S_ISREG(info.st_mode) and is_inside(f, state.output_dir):
            found.append((info.st_mtime, f))
        if len(found) >= MAX_ITEMS * 2:
            break
    found.sort(key=lambda item: item[0], reverse=True)  # stable: one job's files keep their order
    return [f for _, f in found[:MAX_ITEMS]]


def folder_outputs(state: AppState) -> list[str]:
    """Every video and image of the output folder, newest first.

    Links are never followed: what is listed here is sent to the browser, and a symlink in the
    output folder may point anywhere (the queue file with everyone's prompts, a key). Only regular
    files directly in the (resolved) folder are listed, never a link, whatever it points to."""
    folder = Path(os.path.realpath(state.output_dir))
    if not folder.is_dir():
        return []
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if Path(entry.name).suffix.lower() in SHOWN_SUFFIXES and entry.is_file(follow_symlinks=False):
                found.append((entry.stat(follow_symlinks=False).st_mtime, entry.path))
    found.sort(key=lambda item: item[0], reverse=True)
    return [path for _, path in found[:MAX_ITEMS]]


def items(state: AppState, session: str, show_all: bool, jobs: list | None = None) -> list[str]:
    """What the gallery shows. On a shared server only this session's outputs (the whole folder
    holds everyone's, and their settings hold their prompts). Never raises: a file that cannot be
    listed leaves the gallery empty, not the page broken."""
    try:
        if show_all and not getattr(state, "shared", False):
            return folder_outputs(state)
        return session_outputs(state, session, jobs)
    except Exception as e:  # noqa: BLE001 - the page refreshes every second: warn once
        state.warn_once(f"the gallery cannot list the outputs: {type(e).__name__}: {e}")
        return []


def settings_of(path: str | None) -> tuple[str, object]:
    """(pretty JSON of the request inside ``path``, the request) or an explanation and None."""
    from wan.engine.engine import request_from_metadata
    from wan.engine.media_out import read_metadata
    if not path:
        return "", None
    try:
        request = request_from_metadata(read_metadata(path))
    except Exception as e:  # any unreadable or foreign file: say so, keep serving
        return f"// {Path(path).name}: no Wan Studio settings inside ({e})", None
    return json.dumps(request.to_dict(), indent=2, ensure_ascii=False), request


def continuation_of(path: str | None):
    """(the request that continues the output video ``path``: its own settings with the video as
    ``continue_video``, or None; what to tell the user)."""
    from wan.engine.request import TASK_INPUTS
    if not path or Path(path).suffix.lower() != ".mp4":
        return None, "⚠️ select a video in the gallery first (an image cannot be continued)"
    _, request = settings_of(path)
    if request is None:
        return None, (f"⚠️ {Path(path).name} holds no Wan Studio settings: upload it as the video to continue of a "
                      "task instead")
    if "continue_video" not in TASK_INPUTS.get(request.task, ()):
        can = ", ".join(t for t, inputs in TASK_INPUTS.items() if "continue_video" in inputs)
        return None, (f"⚠️ {Path(path).name} was made by task {request.task}, which cannot continue a video; "
                      f"the tasks that can: {can}. Upload it as the video to continue of one of them")
    return request.replace(continue_video=path), (f"The settings of {Path(path).name} are in the form, with the video "
                                                  "as the video to continue: Add to queue makes the frames that "
                                                  "follow it.")


def render(shared: bool = False) -> dict:
    """``shared``: the server is reachable by others, so only this session's outputs are shown."""
    ui = {}
    ui["show_all"] = gr.Checkbox(False, label="Show every output in the folder (not only this session's)",
                                 elem_id="show-all", visible=not shared)
    ui["gallery"] = gr.Gallery([], label="Outputs", columns=4, height=420, elem_id="gallery", interactive=False)
    ui["selected"] = gr.State(None)
    ui["shown"] = gr.State(None)  # the items as last sent to this session (what a click indexes)
    with gr.Row():
        with gr.Column():
            with gr.Row():
                ui["load"] = gr.Button("Load these settings into the form", elem_id="load-settings")
                ui["continue"] = gr.Button("Continue this video", elem_id="continue-output")
            # what Load or a dropped file did, right under the button that was pressed
            ui["message"] = gr.Markdown("", elem_id="gallery-message")
        ui["drop"] = gr.File(label="Drop an earlier output here to restore its settings",
                             file_types=[".mp4", ".png", ".json", ".webp", ".jpg"], elem_id="drop-output")
    ui["settings"] = gr.Code("", language="json", label="Settings of the selected output", elem_id="output-settings")
    return ui


def listen(state: AppState, ui: dict, session, load_request) -> None:
    """``load_request(request)`` returns the form updates for a request (``ui_generate.load_into_form``)
    plus the message; the caller gives the form's components as ``ui["form_outputs"]``, and the
    accordion that holds the video to continue as ``ui["windows_box"]``."""
    def refresh(session_id, show_all):
        now = items(state, session_id, show_all)
        return now, now
    ui["show_all"].change(refresh, [session, ui["show_all"]], [ui["gallery"], ui["shown"]])

    def select(evt: gr.SelectData, shown):
        # index what the browser shows (the list as last sent), not a list made now: a job that
        # finished in between would shift every index by one
        shown = shown or []
        path = shown[evt.index] if isinstance(evt.index, int) and evt.index < len(shown) else None
        text, _ = settings_of(path)
        return path, text
    ui["gallery"].select(select, ui["shown"], [ui["selected"], ui["settings"]])

    def own_inputs(request) -> tuple[object, str]:
        request, dropped = state.keep_own_inputs(request)
        note = f" Input files not on this server were left out: {', '.join(dropped)}." if dropped else ""
        return request, note

    def load(path):
        _, request = settings_of(path)
        if request is None:
            return [*load_request(None), "⚠️ select an output made by Wan Studio first"]
        request, note = own_inputs(request)
        return [*load_request(request), f"Loaded the settings of {Path(path).name}.{note}"]
    ui["load"].click(load, ui["selected"], [*ui["form_outputs"], ui["message"]])

    def continue_(path):
        request, said = continuation_of(path)
        if request is None:
            return [*load_request(None), said, gr.update()]
        request, note = own_inputs(request)
        return [*load_request(request), said + note, gr.update(open=True)]  # where the video to continue shows
    ui["continue"].click(continue_, ui["selected"], [*ui["form_outputs"], ui["message"], ui["windows_box"]])

    def dropped(file):
        path = getattr(file, "name", file)
        text, request = settings_of(path)
        if request is None:
            return [*load_request(None), f"⚠️ {text.lstrip('/ ')}", text]
        request, note = own_inputs(request)
        return [*load_request(request), f"Restored the settings of the dropped file {Path(path).name}.{note}", text]
    ui["drop"].upload(dropped, ui["drop"], [*ui["form_outputs"], ui["message"], ui["settings"]])
