"""The studio's Gradio server: one page (generate, queue, outputs, settings) over one shared
:class:`~wan.app.state.AppState`, plus API endpoints for scripts (``gradio_client``):

    /generate   a request as JSON (the fields of GenerationRequest) -> waits, returns the files
    /queue_job  the same, returns the job id at once
    /job        a job id -> its status, files and error

Building the page imports no model code: torch and the networks load with the first job.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import gradio as gr

from wan.app import ui_gallery, ui_generate, ui_loras, ui_queue, ui_settings
from wan.app.settings import ServerSettings
from wan.app.state import AppState

log = logging.getLogger(__name__)
API_SESSION = "api"
CSS = "#message p, #queue-message p {font-weight: 600}"


def build_app(state: AppState, config_path: str | Path | None = None) -> gr.Blocks:
    with gr.Blocks(title="Wan Studio", analytics_enabled=False) as demo:
        session = gr.BrowserState("", storage_key="wan_studio_session")
        gr.Markdown("## Wan Studio", elem_id="title")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=3):
                        form = ui_generate.render(state)
                        loras = ui_loras.render(state, form)
                        add = gr.Button("Add to queue", variant="primary", elem_id="add-job")
                        message = gr.Markdown("", elem_id="message")
                    with gr.Column(scale=2):
                        queue = ui_queue.render()
                        gallery = ui_gallery.render()
            with gr.Tab("Settings", id="settings"):
                settings_ui = ui_settings.render(state)
        _wire(demo, state, session, form, loras, add, message, queue, gallery)
        ui_settings.listen(state, settings_ui, config_path or "wan_studio.yaml")
        _api(state)
    return demo


def _wire(demo, state, session, form, loras, add, message, queue, gallery) -> None:
    queue_outputs = ui_queue.outputs(queue)
    generate = ui_generate.listen(state, form, on_added=lambda s, shown: ui_queue.views(state, s, None, shown))
    ui_loras.listen(state, form, loras)
    ui_queue.listen(state, queue, session)
    keys = generate.keys
    add.click(generate.add, [session, queue["shown"], *[form[k] for k in keys]], [message, *queue_outputs])

    def load_request(request):
        if request is None:
            return [gr.update() for _ in keys]
        return ui_generate.load_into_form(state, form, request)
    gallery["form_outputs"] = [form[k] for k in keys]
    ui_gallery.listen(state, gallery, session, load_request)

    def start(session_id, model_id):
        session_id = session_id or uuid.uuid4().hex
        updates = generate.on_model(model_id, None)
        choices, table = ui_loras.lora_rows(state, model_id)
        return [session_id, *updates, gr.update(choices=choices), table,
                ui_generate.plan_text(state, model_id, state.settings.profile or "default"),
                *ui_queue.views(state, session_id, None), *[ui_gallery.items(state, session_id, False)] * 2]
    demo.load(start, [session, form["model"]],
              [session, *[form[k] for k in generate.model_outputs], form["loras"], loras["table"], form["plan"],
               *queue_outputs, gallery["gallery"], gallery["shown"]])

    timer = gr.Timer(1.0)
    shown = gallery["shown"]

    def tick(session_id, picked, show_all, last_items, last_choices):
        jobs = state.queue.jobs()  # one snapshot for the whole refresh
        items = ui_gallery.items(state, session_id, show_all, jobs)
        views = ui_queue.views(state, session_id, picked, last_choices, jobs)
        return [*views, gr.update() if items == last_items else items, items]
    timer.tick(tick, [session, queue["pick"], gallery["show_all"], shown, queue["shown"]],
               [*queue_outputs, gallery["gallery"], shown], show_progress="hidden")


def _api(state: AppState) -> None:
    """Script endpoints; jobs go through the same queue as the UI's."""
    from wan.engine.request import GenerationRequest, RequestError, resolve_request

    def submit(request_json: str) -> str:
        from wan.app.security import is_inside
        try:
            data = json.loads(request_json)
            request = GenerationRequest.from_dict(data)
            if "output_dir" in data and not is_inside(request.output_dir, state.output_dir):
                raise RequestError("output_dir", request.output_dir,
                                   f"the server's output folder {state.output_dir.resolve()} or a folder inside it")
            resolve_request(state.prepare(request))
            return state.queue.add(request.to_dict(), API_SESSION).id
        except (RequestError, ValueError, TypeError) as e:
            raise gr.Error(str(e)) from None

    def job(job_id: str) -> dict:
        found = state.queue.get(job_id)
        if found is None:
            raise gr.Error(f"job: {job_id!r} is not in the queue")
        return {"id": found.id, "status": found.status, "files": found.files, "error": found.error,
                "notices": found.notices}

    def generate(request_json: str) -> dict:
        """Queues the request and waits for its job to finish."""
        job_id = submit(request_json)
        state.queue.wait_finished(job_id)
        result = job(job_id)
        if result["status"] != "done":
            raise gr.Error(f"job {job_id} {result['status']}: {result['error'] or ''}")
        return result
    gr.api(submit, api_name="queue_job", concurrency_limit=None)
    gr.api(job, api_name="job", concurrency_limit=None)
    gr.api(generate, api_name="generate", concurrency_limit=None)


def serve(settings: ServerSettings, config_path: str | Path | None = None) -> None:
    """Builds the app, starts the queue's worker and serves until interrupted."""
    from wan.app.security import allowed_paths, blocked_paths
    from wan.app.access import find_port, listen_warning, read_auth, share_warning
    logging.basicConfig(level=logging.DEBUG if settings.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):  # one line per request gradio makes to itself
        logging.getLogger(noisy).setLevel(logging.DEBUG if settings.verbose else logging.WARNING)
    for warning in (share_warning(settings), listen_warning(settings)):
        if warning:
            print(f"warning: {warning}", flush=True)
    port, note = find_port(settings.host, settings.server_port)
    if note:
        print(note, flush=True)
    state = AppState(settings)
    demo = build_app(state, config_path)
    state.queue.start()
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name=settings.host, server_port=port, share=settings.share, auth=read_auth(settings),
            inbrowser=settings.open_browser, allowed_paths=allowed_paths(settings),
            blocked_paths=blocked_paths(settings, config_path), max_file_size=f"{settings.max_upload_mb}mb",
            css=CSS, quiet=not settings.verbose, footer_links=["api", "settings"], prevent_thread_lock=True)
        print(f"Wan Studio is serving at http://{settings.host}:{port}", flush=True)
        demo.block_thread()
    finally:
        state.queue.stop(timeout=5)
