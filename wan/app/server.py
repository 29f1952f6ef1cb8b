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

from wan.app import ui_gallery, ui_generate, ui_loras, ui_queue, ui_settings, ui_train
from wan.app.settings import ServerSettings
from wan.app.jobs import MAX_SESSION_CHARS, printable, printable_lines
from wan.app.state import API_SESSION, AppState

log = logging.getLogger(__name__)
CSS = "#message p, #queue-message p {font-weight: 600}"


def build_app(state: AppState, config_path: str | Path | None = None) -> gr.Blocks:
    with gr.Blocks(title="Wan Studio", analytics_enabled=False) as demo:
        session = gr.BrowserState("", storage_key="wan_studio_session")
        gr.Markdown("## Wan Studio", elem_id="title")
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=3):
                        form = ui_generate.render(state)
                        loras = ui_loras.render(state, form)
                        add = gr.Button("Add to queue", variant="primary", elem_id="add-job")
                        message = gr.Markdown("", elem_id="message")
                    with gr.Column(scale=2):
                        queue = ui_queue.render()
                        gallery = ui_gallery.render(shared=state.shared)
            with gr.Tab("Train", id="train") as train_tab:  # -- the Train tab (wan/app/ui_train.py) --
                train_ui = ui_train.render(state)
            with gr.Tab("Settings", id="settings"):
                settings_ui = ui_settings.render(state)
        generate = _wire(demo, state, session, form, loras, add, message, queue, gallery)
        ui_train.listen(state, train_ui, session, tab=train_tab, tabs=tabs, form=form, loras=loras, generate=generate)
        ui_settings.listen(state, settings_ui, config_path or "wan_studio.yaml")
        _api(state)
        ui_train.api(state)  # /queue_train, /resume_train
    return demo


def _wire(demo, state, session, form, loras, add, message, queue, gallery):
    """Wires the Generate tab and the page's timer; returns ``ui_generate.listen``'s result."""
    queue_outputs = ui_queue.outputs(queue)
    generate = ui_generate.listen(state, form, on_added=lambda s, shown: ui_queue.views(state, s, None, shown))
    ui_loras.listen(state, form, loras)
    ui_queue.listen(state, queue, session)
    keys = generate.keys
    add.click(generate.add, [session, queue["shown"], *[form[k] for k in keys]], [message, *queue_outputs],
              show_progress_on=[message])  # the progress by the button, never over the queue's status line
    form["download"].click(generate.download, [session, queue["shown"], form["model"]], [message, *queue_outputs],
                           show_progress_on=[message])

    def load_request(request):
        if request is None:
            return [gr.update() for _ in keys]
        return ui_generate.load_into_form(state, form, request)
    gallery["form_outputs"] = [form[k] for k in keys]
    gallery["windows_box"] = form["windows_box"]
    ui_gallery.listen(state, gallery, session, load_request)

    def start(session_id, model_id, memory):
        session_id = session_id if valid_session(session_id) else uuid.uuid4().hex
        model_id = ui_generate.last_model(memory, model_id)  # the page opens where this browser left it
        updates = generate.on_model(model_id, None, memory)
        choices, table = ui_loras.lora_rows(state, model_id)
        return [session_id, model_id, *updates, gr.update(choices=choices), table,
                ui_generate.plan_text(state, model_id, state.settings.profile or ui_generate.DEFAULT_PROFILE),
                *ui_generate.readiness_updates(state, model_id),
                *ui_queue.views(state, session_id, None), *[ui_gallery.items(state, session_id, False)] * 2]
    demo.load(start, [session, form["model"], form["memory"]],
              [session, form["model"], *[form[k] for k in generate.model_outputs], form["loras"], loras["table"],
               form["plan"],
               form["readiness"], form["download"], *queue_outputs, gallery["gallery"], gallery["shown"]])

    timer = gr.Timer(1.0)
    shown = gallery["shown"]

    def tick(session_id, picked, show_all, last_items, last_choices, detail_now, message_now):
        return refresh(state, session_id, picked, show_all, last_items, last_choices, detail_now, message_now)
    timer.tick(tick, [session, queue["pick"], gallery["show_all"], shown, queue["shown"], queue["detail"], message],
               [*queue_outputs, gallery["gallery"], shown, queue["detail"], message], **ui_queue.QUIET)
    return generate


def valid_session(session_id) -> bool:
    """A session id the page may keep: a short printable string, never the API's."""
    return (isinstance(session_id, str) and 0 < len(session_id) <= MAX_SESSION_CHARS and session_id.isprintable()
            and session_id != API_SESSION)


def refresh(state: AppState, session_id, picked, show_all, last_items, last_choices, detail_now=None,
            message_now=None) -> list:
    """The timer's refresh of one session's page: the queue panel's outputs, the gallery and its
    shown items, the picked job's details, and the message by the Add button (which says so when a
    job it names has failed). Never raises, whatever the jobs hold (the views render what they can)."""
    try:
        jobs = state.queue.jobs()  # one snapshot for the whole refresh
        items = ui_gallery.items(state, session_id, bool(show_all), jobs)
        views = ui_queue.views(state, session_id, picked, last_choices, jobs)
        detail = ui_queue.detail_update(state, session_id, picked, detail_now, jobs)
        notice = ui_queue.failure_notice(state, session_id, message_now, jobs)
        return [*views, gr.update() if items == last_items else items, items, detail,
                gr.update() if notice is None else notice]
    except Exception as e:  # noqa: BLE001 - a bug of ours: the page keeps what it shows
        state.warn_once(f"the page refresh failed: {type(e).__name__}: {printable(e, 300)}")
        return [gr.update() for _ in range(4)] + [last_choices, gr.update(), last_items, gr.update(), gr.update()]


def refusal(message: str) -> gr.Error:
    """A refused API call: one line in the log, the message to the client, and no traceback
    (gradio prints one for every gr.Error unless told not to)."""
    text = printable(message, 1000)
    log.warning("refused an API call: %s", text)
    return gr.Error(text, print_exception=False)


def _api(state: AppState) -> None:
    """Script endpoints; jobs go through the same queue as the UI's."""
    from wan.engine.request import GenerationRequest, RequestError

    def submit(request_json: str) -> str:
        from wan.app.security import accept_request
        try:
            try:
                data = json.loads(request_json)
            except (TypeError, ValueError, RecursionError) as e:
                raise RequestError("request", request_json, f"a JSON object of request fields ({e})") from None
            accept_request(data, state)
            return state.queue.add(GenerationRequest.from_dict(data).to_dict(), API_SESSION).id
        except (RequestError, ValueError) as e:
            raise refusal(str(e)) from None

    def job(job_id: str) -> dict:
        found = state.queue.get(job_id) if isinstance(job_id, str) else None
        if found is None:
            raise refusal(f"job: {printable(repr(job_id), 80)} is not in the queue")
        # printable: a text of the job's that JSON cannot carry would fail the answer, not the job
        return {"id": found.id, "status": found.status, "files": [printable(f) for f in found.files],
                "error": printable_lines(found.error) if found.error is not None else None,
                "notices": [printable(n) for n in found.notices]}

    def generate(request_json: str) -> dict:
        """Queues the request and waits for its job to finish."""
        job_id = submit(request_json)
        state.queue.wait_finished(job_id)
        result = job(job_id)
        if result["status"] != "done":  # the queue logged why; no traceback of this wait
            raise gr.Error(printable(f"job {job_id} {result['status']}: {result['error'] or ''}", 1000),
                           print_exception=False)
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
    if settings.gpus:  # a GPU this machine lacks is named before anything starts
        from wan.app.gpu_workers import check_devices
        from wan.app.settings import parse_gpus
        check_devices(parse_gpus(settings.gpus))
    port, note = find_port(settings.host, settings.server_port)
    if note:
        print(note, flush=True)
    state = AppState(settings)
    demo = build_app(state, config_path)
    state.queue.start()
    if state.workers is not None:
        print(f"GPU workers: {settings.gpus} ({settings.gpu_mode}), starting", flush=True)
        state.workers.warm_up()
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name=settings.host, server_port=port, share=settings.share, auth=read_auth(settings),
            inbrowser=settings.open_browser, allowed_paths=allowed_paths(settings),
            blocked_paths=blocked_paths(settings, config_path), max_file_size=f"{settings.max_upload_mb}mb",
            css=CSS, quiet=not settings.verbose, footer_links=["api", "settings"], prevent_thread_lock=True)
        print(f"Wan Studio is serving at http://{settings.host}:{port}", flush=True)
        demo.block_thread()
    finally:
        state.close(timeout=5)
