"""Outputs: a gallery of this session's videos and images (or of the whole output folder), the
settings of the selected one, and two ways back into the form: "Load these settings", or dropping
an earlier output file (mp4, png, or its .json sidecar) onto the app.

Settings come from the metadata every output carries (the resolved request, see
``Engine.metadata``), so an output made weeks ago restores exactly what made it.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from wan.app.state import AppState

SHOWN_SUFFIXES = (".mp4", ".png", ".jpg", ".webp")
MAX_ITEMS = 200


def session_outputs(state: AppState, session: str) -> list[str]:
    """Files of this session's finished jobs, newest first."""
    files = []
    for job in state.queue.jobs(session=session, include_finished=True):
        if job.status == "done":
            files += [f for f in job.files if Path(f).suffix.lower() in SHOWN_SUFFIXES and Path(f).is_file()]
    return files[:MAX_ITEMS]


def folder_outputs(state: AppState) -> list[str]:
    """Every video and image of the output folder, newest first."""
    found = [p for p in state.output_dir.glob("*") if p.suffix.lower() in SHOWN_SUFFIXES and p.is_file()]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [str(p) for p in found[:MAX_ITEMS]]


def items(state: AppState, session: str, show_all: bool) -> list[str]:
    return folder_outputs(state) if show_all else session_outputs(state, session)


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


def render() -> dict:
    ui = {}
    ui["show_all"] = gr.Checkbox(False, label="Show every output in the folder (not only this session's)",
                                 elem_id="show-all")
    ui["gallery"] = gr.Gallery([], label="Outputs", columns=4, height=420, elem_id="gallery", interactive=False)
    ui["selected"] = gr.State(None)
    with gr.Row():
        ui["load"] = gr.Button("Load these settings into the form", elem_id="load-settings")
        ui["drop"] = gr.File(label="Drop an earlier output here to restore its settings",
                             file_types=[".mp4", ".png", ".json", ".webp", ".jpg"], elem_id="drop-output")
    ui["settings"] = gr.Code("", language="json", label="Settings of the selected output", elem_id="output-settings")
    ui["message"] = gr.Markdown("", elem_id="gallery-message")
    return ui


def listen(state: AppState, ui: dict, session, load_request) -> None:
    """``load_request(request)`` returns the form updates for a request (``ui_generate.load_into_form``)
    plus the message; the caller gives the form's components as ``ui["form_outputs"]``."""
    def refresh(session_id, show_all):
        return items(state, session_id, show_all)
    ui["show_all"].change(refresh, [session, ui["show_all"]], ui["gallery"])

    def select(evt: gr.SelectData, session_id, show_all):
        shown = items(state, session_id, show_all)
        path = shown[evt.index] if isinstance(evt.index, int) and evt.index < len(shown) else None
        text, _ = settings_of(path)
        return path, text
    ui["gallery"].select(select, [session, ui["show_all"]], [ui["selected"], ui["settings"]])

    def load(path):
        _, request = settings_of(path)
        if request is None:
            return [*load_request(None), "⚠️ select an output made by Wan Studio first"]
        return [*load_request(request), f"Loaded the settings of {Path(path).name}."]
    ui["load"].click(load, ui["selected"], [*ui["form_outputs"], ui["message"]])

    def dropped(file):
        path = getattr(file, "name", file)
        text, request = settings_of(path)
        if request is None:
            return [*load_request(None), f"⚠️ {text.lstrip('/ ')}", text]
        return [*load_request(request), f"Restored the settings of the dropped file {Path(path).name}.", text]
    ui["drop"].upload(dropped, ui["drop"], [*ui["form_outputs"], ui["message"], ui["settings"]])
