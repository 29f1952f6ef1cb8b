"""The Train tab: a LoRA trained on your own clips or images, through the same queue as generation.

1. **Dataset**: a folder (or a musubi dataset TOML) in the datasets folder; the preview shows each
   item with its caption, size, bucket and the frames taken from it, and the warnings; a missing
   caption is written in place; the TOML trained on is shown (and saved beside the dataset).
2. **Options**: a model ready on this machine (Wan 2.2 A14B: one LoRA or two), the LoRA's name, rank,
   alpha, learning rate, steps or epochs, timestep sampling, a memory preset with its estimate, sample
   prompts, and any other training flag as ``--flag value`` text.
3. **Runs**: Start queues the run (the queue shows it with the generations); Stop saves its state and
   ends it; Resume continues a stopped or interrupted run from its last saved state. The picked run's
   loss (raw and smoothed) and learning rate, speed, ETA, last checkpoint and sample videos refresh
   while it trains; when it is done, "Use on Generate" selects its LoRA on the Generate tab.

The logic is in :mod:`wan.app.train_form` (the form -> requests), :mod:`wan.app.train_dataset`,
:mod:`wan.app.train_jobs` (the runner) and :mod:`wan.app.train_live` (what a run shows); this module
only renders and wires. Building it imports no torch.
"""

from __future__ import annotations

import logging

import gradio as gr

from wan.app.jobs import printable
from wan.app.state import API_SESSION, AppState
from wan.app.train_form import (DEFAULTS, FORM_KEYS, LORA_MODES, MEMORY_LABELS, is_two_expert, label, memory_text,
                                model_choices, recommendation)
from wan.app.train_request import TrainRequestError
from wan.app.words import literal

log = logging.getLogger(__name__)
QUIET = {"show_progress": "hidden", "show_progress_on": []}
ITEM_HEADERS = ["kind", "file", "caption", "size", "frames -> windows", "bucket", "problems"]
SAMPLINGS = ("shift", "sigma", "uniform", "sigmoid", "logsnr", "flux_shift", "qwen_shift")
PROMPT_HINT = "a fox in the snow --w 64 --h 64 --f 9 --s 20   (one per line; --w --h --f --s --g --d: size, frames, steps...)"


def render(state: AppState) -> dict:
    """The tab's controls by key (the form's keys are :data:`wan.app.train_form.FORM_KEYS`)."""
    from wan.app.train_dataset import FRAME_CHOICES, source_choices
    ui: dict = {}
    d = DEFAULTS
    gr.Markdown("Train a LoRA on your own clips or images. Put a folder of videos and/or images, each with a "
                f"caption file of the same name (`clip.mp4` + `clip.txt`), in `{literal(state.settings.datasets_dir)}`, "
                "preview it, pick the options, Start: the run waits in the queue with the generations.",
                elem_id="train-intro")
    with gr.Accordion("1 · Dataset", open=True):
        with gr.Row():
            ui["dataset"] = gr.Dropdown(source_choices(state.settings), value=None, label="Dataset folder or TOML",
                                        allow_custom_value=True, elem_id="train-dataset", scale=4)
            ui["refresh"] = gr.Button("Refresh", elem_id="train-dataset-refresh", scale=0, min_width=90)
            ui["preview"] = gr.Button("Preview", variant="secondary", elem_id="train-preview", scale=0, min_width=90)
        with gr.Row():
            ui["width"] = gr.Number(d["width"], label="Width", precision=0, elem_id="train-width")
            ui["height"] = gr.Number(d["height"], label="Height", precision=0, elem_id="train-height")
            ui["frames"] = gr.Number(d["frames"], label="Frames per clip (4k+1)", precision=0, elem_id="train-frames")
            ui["frame_extraction"] = gr.Dropdown(list(FRAME_CHOICES), value=d["frame_extraction"],
                                                 label="Frame extraction", elem_id="train-extraction",
                                                 info="head: the first frames · chunk: one clip after the other · "
                                                      "slide: every N frames · uniform: N clips spread evenly")
            ui["frame_stride"] = gr.Number(d["frame_stride"], label="Frame stride (slide)", precision=0,
                                           elem_id="train-stride")
            ui["frame_sample"] = gr.Number(d["frame_sample"], label="Clips per video (uniform)", precision=0,
                                           elem_id="train-sample")
            ui["num_repeats"] = gr.Number(d["num_repeats"], label="Repeats", precision=0, elem_id="train-repeats")
        ui["dataset_status"] = gr.Markdown("Pick a dataset and Preview it.", elem_id="train-dataset-status",
                                           latex_delimiters=[])
        ui["thumbs"] = gr.Gallery(label="Items and their captions", columns=8, height=200, elem_id="train-thumbs",
                                  allow_preview=False, fit_columns=False, object_fit="contain")
        ui["items"] = gr.Dataframe(headers=ITEM_HEADERS, value=[], interactive=False, wrap=True,
                                   elem_id="train-items")
        with gr.Row():
            ui["caption_item"] = gr.Dropdown([], label="Item", allow_custom_value=True, elem_id="train-caption-item",
                                             scale=2)
            ui["caption_text"] = gr.Textbox(label="Its caption", elem_id="train-caption-text", scale=4)
            ui["caption_save"] = gr.Button("Save caption", elem_id="train-caption-save", scale=0, min_width=120)
        ui["toml"] = gr.Code("", label="The dataset TOML (musubi-tuner's format; saved beside the dataset at Start)",
                             elem_id="train-toml", interactive=False)
    models = model_choices(state)
    first = next((m for _, m in models if m == state.settings.model), models[0][1] if models else None)
    with gr.Accordion("2 · Options", open=True):
        with gr.Row():
            ui["model"] = gr.Dropdown(models, value=first, label="Model (ready on this machine)",
                                      elem_id="train-model", scale=3)
            ui["lora_mode"] = gr.Radio([(v, k) for k, v in LORA_MODES.items()], value=d["lora_mode"],
                                       label="Wan 2.2 A14B", visible=is_two_expert(first), elem_id="train-lora-mode",
                                       scale=2)
        ui["advice"] = gr.Markdown(recommendation(first), elem_id="train-advice")
        with gr.Row():
            ui["output_name"] = gr.Textbox(label="LoRA name", elem_id="train-name", placeholder="my_style")
            ui["trigger_words"] = gr.Textbox(label="Trigger words (comma separated)", elem_id="train-trigger")
        with gr.Row():
            ui["network_dim"] = gr.Number(d["network_dim"], label="Rank", precision=0, elem_id="train-rank")
            ui["network_alpha"] = gr.Number(d["network_alpha"], label="Alpha", elem_id="train-alpha")
            ui["learning_rate"] = gr.Number(d["learning_rate"], label="Learning rate", elem_id="train-lr")
            ui["max_train_steps"] = gr.Number(d["max_train_steps"], label="Steps", precision=0, elem_id="train-steps")
            ui["max_train_epochs"] = gr.Number(None, label="Epochs (0: train by steps)", precision=0,
                                               elem_id="train-epochs")
        with gr.Row():
            ui["timestep_sampling"] = gr.Dropdown(list(SAMPLINGS), value=d["timestep_sampling"],
                                                  label="Timestep sampling", elem_id="train-sampling")
            ui["discrete_flow_shift"] = gr.Number(d["discrete_flow_shift"], label="Shift (shift sampling)",
                                                  elem_id="train-shift")
            ui["seed"] = gr.Number(d["seed"], label="Seed", precision=0, elem_id="train-seed")
        with gr.Row():
            ui["memory"] = gr.Radio([(v, k) for k, v in MEMORY_LABELS.items()], value=d["memory"],
                                    label="Memory", elem_id="train-memory", scale=2)
            ui["estimate"] = gr.Markdown("", elem_id="train-memory-estimate")
        with gr.Row():
            ui["sample_prompts"] = gr.Textbox(label="Sample prompts", lines=2, placeholder=PROMPT_HINT,
                                              elem_id="train-prompts", scale=3)
            ui["sample_every_n_steps"] = gr.Number(d["sample_every_n_steps"], label="Sample every N steps",
                                                   precision=0, elem_id="train-sample-every")
            ui["save_every_n_steps"] = gr.Number(d["save_every_n_steps"], label="Save every N steps", precision=0,
                                                 elem_id="train-save-every")
        ui["advanced"] = gr.Textbox(label="Advanced: any other training flag (musubi-tuner's names), e.g. "
                                          "--lr_scheduler cosine --lr_warmup_steps 50 --optimizer_type AdamW8bit",
                                    lines=1, elem_id="train-advanced")
    with gr.Row():
        ui["start"] = gr.Button("Start training", variant="primary", elem_id="train-start")
        ui["stop"] = gr.Button("Stop (saves its state)", variant="stop", elem_id="train-stop")
        ui["resume"] = gr.Button("Resume", elem_id="train-resume")
    ui["message"] = gr.Markdown("", elem_id="train-message", latex_delimiters=[])
    with gr.Accordion("3 · Runs", open=True):
        ui["run"] = gr.Dropdown([], label="Run", allow_custom_value=True, elem_id="train-run")
        ui["run_status"] = gr.Markdown("No training run yet.", elem_id="train-run-status", latex_delimiters=[])
        with gr.Row():
            ui["loss"] = gr.LinePlot(None, x="step", y="loss", color="series", title="Loss", height=260,
                                     elem_id="train-loss", x_title="step")
            ui["lr_plot"] = gr.LinePlot(None, x="step", y="lr", title="Learning rate", height=260,
                                        elem_id="train-lr-plot", x_title="step")
        ui["samples"] = gr.Gallery(label="Samples (newest first)", columns=6, height=200, elem_id="train-samples",
                                   allow_preview=False, fit_columns=False, object_fit="contain")
        ui["use"] = gr.Button("Use on Generate", elem_id="train-use")
    ui["shown"] = gr.State(None)       # (run choices, log signature, samples) as last sent to this page
    ui["timer"] = gr.Timer(1.0)
    return ui


# ---------------------------------------------------------------------------------------------
# Handlers (plain functions of values: tested without a browser)


def form_values(keys: list[str], args) -> dict:
    return dict(zip(keys, args))


def show_preview(state: AppState, values: dict, note: str = "") -> list:
    """[status, thumbnails, item rows, caption-item picker, TOML] of the dataset the form names."""
    from wan.app.train_dataset import item_rows, preview, summary, thumbnails
    try:
        result = preview(values.get("dataset"), values, state.settings)
    except TrainRequestError as e:
        return [f"⚠️ {literal(label(e.field))}: {literal(e.message)}", [], [], gr.update(choices=[], value=None), ""]
    warnings = "".join(f"\n- ⚠️ {literal(w)}" for w in result.warnings)
    status = (f"{literal(note)}\n\n" if note else "") + literal(summary(result)) + (
        f"\n\n**Warnings**{warnings}" if warnings else "\n\nNo warnings.")
    missing = [i for i in result.items if not i.caption]
    order = missing + [i for i in result.items if i.caption]
    choices = [(("⚠ " if not i.caption else "") + i.name, i.key) for i in order]
    return [status, thumbnails(result), item_rows(result),
            gr.update(choices=choices, value=choices[0][1] if choices else None), result.toml_text]


def save_caption(state: AppState, values: dict, item, text) -> list:
    """Writes one caption, then shows the dataset again (its warnings updated)."""
    from wan.app.train_dataset import preview, write_caption
    try:
        result = preview(values.get("dataset"), values, state.settings)
        path = write_caption(result, item, text, state.settings)
    except TrainRequestError as e:
        return [f"⚠️ {literal(label(e.field))}: {literal(e.message)}", gr.update(), gr.update(), gr.update(),
                gr.update(), gr.update()]
    return [*show_preview(state, values, note=f"Saved the caption {path.name}."), ""]


def start_runs(state: AppState, values: dict, session) -> tuple[str, str | None]:
    """(message, the first new job's id) for the Start button."""
    from wan.app.train_form import start
    if not _session_ok(session):
        return "⚠️ this page has no session yet; reload it", None
    try:
        jobs = start(state, values, session)
    except TrainRequestError as e:
        return f"⚠️ {literal(e.field)}: {literal(e.message)}", None
    except ValueError as e:
        return f"⚠️ {literal(str(e))}", None
    ids = ", ".join(j.id for j in jobs)
    ahead = len([j for j in state.queue.jobs(include_finished=False) if j.status in ("queued", "running")]) - len(jobs)
    wait = f"; {ahead} job(s) before it in the queue" if ahead > 0 else ""
    return f"Queued the training run{'s' if len(jobs) > 1 else ''}: {ids}{wait}.", jobs[0].id


def stop_run(state: AppState, job_id, session) -> str:
    owner = session if state.shared else None
    job = state.queue.get(job_id) if isinstance(job_id, str) and job_id else None
    if job is None:
        return "⚠️ pick a run first"
    try:
        if not state.queue.abort(job.id, owner=owner):
            return f"Run {job.id} has ended already."
    except ValueError as e:
        return f"⚠️ {literal(str(e))}"
    return (f"Stopping {job.id}: its LoRA and state are saved after the current step." if job.status == "running"
            else f"Cancelled {job.id} before it started.")


def resume_run(state: AppState, job_id, session) -> tuple[str, str | None]:
    from wan.app.train_jobs import queue_resume
    if not _session_ok(session):
        return "⚠️ this page has no session yet; reload it", None
    try:
        job = queue_resume(state, job_id, session, owner=session if state.shared else None)
    except TrainRequestError as e:
        return f"⚠️ {literal(e.field)}: {literal(e.message)}", None
    except ValueError as e:
        return f"⚠️ {literal(str(e))}", None
    return f"Queued {job.id}: {literal(job.label)}.", job.id


def live(state: AppState, picked, session, shown) -> list:
    """The timer's refresh: [run picker, status, loss plot, lr plot, samples, shown]; only what changed
    is sent. Never raises."""
    from wan.app.train_live import (default_run, log_path, plot_frames, read_log, run_choices, samples,
                                    status_text, visible_runs)
    try:
        jobs = state.queue.jobs()
        runs = visible_runs(state, session, jobs)
        choices = [list(c) for c in run_choices(runs)]
        ids = {c[1] for c in choices}
        old_choices, old_sig, old_samples = shown if isinstance(shown, (list, tuple)) and len(shown) == 3 else \
            (None, None, None)
        if picked not in ids:
            picked = default_run(runs)
            pick = gr.update(choices=[tuple(c) for c in choices], value=picked)
        elif choices != old_choices:
            pick = gr.update(choices=[tuple(c) for c in choices])
        else:
            pick = gr.update()
        job = next((j for j in runs if j.id == picked), None)
        if job is None:
            return [pick, "No training run yet.", gr.update(), gr.update(), gr.update(), [choices, None, None]]
        records = read_log(log_path(job))
        sig = f"{job.id}:{len(records)}:{records[-1]['step'] if records else 0}"
        found = samples(job)
        plots = [gr.update(), gr.update()]
        if sig != old_sig:
            loss, lr = plot_frames(records)
            plots = [loss, lr]
        gallery = gr.update() if found == old_samples else found
        return [pick, status_text(state, job, jobs), *plots, gallery, [choices, sig, found]]
    except Exception as e:  # noqa: BLE001 - a refresh each second must never break the page
        state.warn_once(f"the Train tab's refresh failed: {type(e).__name__}: {printable(e, 300)}")
        return [gr.update()] * 5 + [shown]


def _session_ok(session) -> bool:
    return isinstance(session, str) and bool(session) and session != API_SESSION


# ---------------------------------------------------------------------------------------------
# Wiring


def listen(state: AppState, ui: dict, session, *, tab, tabs, form: dict, loras: dict, generate) -> None:
    """Wires the tab (``tab``: opening it lists the datasets again and shows the memory estimate); ``tabs``,
    ``form``, ``loras`` and ``generate`` (``ui_generate.listen``'s result) are the Generate tab's, for
    "Use on Generate"."""
    keys = [k for k in FORM_KEYS]
    inputs = [ui[k] for k in keys]
    dataset_keys = ["dataset", "width", "height", "frames", "frame_extraction", "frame_stride", "frame_sample",
                    "num_repeats"]
    preview_outputs = [ui["dataset_status"], ui["thumbs"], ui["items"], ui["caption_item"], ui["toml"]]

    def refresh_sources(current):
        from wan.app.train_dataset import source_choices
        choices = source_choices(state.settings)
        return gr.update(choices=choices, value=current if current else None)
    ui["refresh"].click(refresh_sources, ui["dataset"], ui["dataset"])
    ui["preview"].click(lambda *a: show_preview(state, form_values(dataset_keys, a)),
                        [ui[k] for k in dataset_keys], preview_outputs)
    ui["caption_save"].click(lambda *a: save_caption(state, form_values(dataset_keys, a[:-2]), a[-2], a[-1]),
                             [*(ui[k] for k in dataset_keys), ui["caption_item"], ui["caption_text"]],
                             [*preview_outputs, ui["caption_text"]])

    def on_model(model_id):
        return gr.update(visible=is_two_expert(model_id)), recommendation(model_id)
    ui["model"].change(on_model, ui["model"], [ui["lora_mode"], ui["advice"]])
    estimate_keys = ["model", "memory", "network_dim", "network_alpha", "width", "height", "frames", "lora_mode"]
    gr.on([ui[k].change for k in estimate_keys],
          lambda *a: memory_text(a[0], form_values(estimate_keys, a)), [ui[k] for k in estimate_keys], ui["estimate"],
          trigger_mode="always_last", **QUIET)

    def on_open(current, *values):  # the estimate needs torch: computed when the tab opens, not at page load
        return refresh_sources(current), memory_text(values[0], form_values(estimate_keys, values))
    tab.select(on_open, [ui["dataset"], *(ui[k] for k in estimate_keys)], [ui["dataset"], ui["estimate"]], **QUIET)

    def start(session_id, *args):
        message, job_id = start_runs(state, form_values(keys, args), session_id)
        return message, (gr.update(value=job_id) if job_id else gr.update())
    ui["start"].click(start, [session, *inputs], [ui["message"], ui["run"]])
    ui["stop"].click(lambda j, s: stop_run(state, j, s), [ui["run"], session], ui["message"])

    def resume(job_id, session_id):
        message, new = resume_run(state, job_id, session_id)
        return message, (gr.update(value=new) if new else gr.update())
    ui["resume"].click(resume, [ui["run"], session], [ui["message"], ui["run"]])
    ui["timer"].tick(lambda p, s, shown: live(state, p, s, shown), [ui["run"], session, ui["shown"]],
                     [ui["run"], ui["run_status"], ui["loss"], ui["lr_plot"], ui["samples"], ui["shown"]], **QUIET)
    ui["run"].change(lambda p, s: live(state, p, s, None), [ui["run"], session],
                     [ui["run"], ui["run_status"], ui["loss"], ui["lr_plot"], ui["samples"], ui["shown"]], **QUIET)
    _listen_use(state, ui, session, tabs, form, loras, generate)


def _listen_use(state: AppState, ui: dict, session, tabs, form: dict, loras: dict, generate) -> None:
    """"Use on Generate": the Generate tab opens on the run's model with its LoRA selected."""
    from wan.app.ui_loras import lora_rows
    keys = list(dict.fromkeys(["model", *generate.model_outputs, "loras", "lora_multipliers", "prompt"]))
    outputs = [tabs, ui["message"], *(form[k] for k in keys), loras["table"]]

    def use(job_id, model_now, memory, session_id):
        from wan.app.train_live import generate_choice
        nothing = [gr.update() for _ in range(len(keys) + 1)]
        job = state.queue.get(job_id) if isinstance(job_id, str) and job_id else None
        if job is None or (state.shared and job.session != session_id):
            return [gr.update(), "⚠️ pick a run first", *nothing]
        choice = generate_choice(state, job)
        if choice is None:
            return [gr.update(), f"⚠️ run {job.id} has no LoRA yet ({job.status}); use it once it is done", *nothing]
        model_id, picked, mults, prompt = choice
        updates = {}
        if model_id != model_now:
            updates.update(dict(zip(generate.model_outputs, generate.on_model(model_id, None, memory))))
        choices, table = lora_rows(state, model_id)
        updates.update(model=gr.update(value=model_id), loras=gr.update(choices=choices, value=picked),
                       lora_multipliers=mults)
        if prompt:
            updates["prompt"] = prompt
        return [gr.Tabs(selected="generate"), f"Selected {literal(', '.join(picked))} on the Generate tab.",
                *(updates.get(k, gr.update()) for k in keys), table]
    ui["use"].click(use, [ui["run"], form["model"], form["memory"], session], outputs)


# ---------------------------------------------------------------------------------------------
# Script endpoints


def api(state: AppState) -> None:
    """``/queue_train`` (a training request as JSON -> the job id) and ``/resume_train`` (a job id -> the
    new job's id), for scripts; jobs of the API session, through the same checks and queue as the tab's."""
    import json

    from wan.app.server import refusal
    from wan.app.train_jobs import queue_resume, queue_training

    def queue_train(request_json: str) -> str:
        try:
            try:
                data = json.loads(request_json)
            except (TypeError, ValueError, RecursionError) as e:
                raise TrainRequestError("request", f"a JSON object ({e})") from None
            return queue_training(state, data, API_SESSION).id
        except ValueError as e:
            raise refusal(str(e)) from None

    def resume_train(job_id: str) -> str:
        try:
            return queue_resume(state, job_id, API_SESSION, owner=API_SESSION if state.shared else None).id
        except ValueError as e:
            raise refusal(str(e)) from None
    gr.api(queue_train, api_name="queue_train", concurrency_limit=None)
    gr.api(resume_train, api_name="resume_train", concurrency_limit=None)


__all__ = ["render", "listen", "api"]
