"""The generation form: model and task, the inputs the task needs, the settings, the profile with
its memory plan, the step savers, and the "Add to queue" button.

Every control's key is a request field name or a form key of :mod:`wan.app.form`; ``render``
returns them in a dict so the LoRA browser, the gallery ("load settings") and the queue can read
and write the same controls.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from wan.app.form import (
    CUSTOM,
    KEEP,
    PICKER_CHOICES,
    form_to_requests,
    request_to_form,
    resolution_choices,
    saver_defaults,
)
from wan.app.state import AppState
from wan.engine.request import SAMPLERS, TASK_INPUTS, RequestError, request_default

# inputs of each task, in the order they are shown (request field names)
TASK_INPUT_FIELDS = ("image", "end_image", "video", "strength", "control_video", "mask_video", "ref_images",
                     "vace_scale")
INPUT_LABELS = {"image": "Start image", "end_image": "End image", "video": "Input video",
                "control_video": "Control video", "mask_video": "Mask video", "ref_images": "Reference images"}
UPLOAD_KINDS = {"image": "image", "end_image": "image", "video": "video", "control_video": "video",
                "mask_video": "video", "ref_images": "image"}


class CheckedImage(gr.Image):
    """An image input whose unreadable upload is refused with the label the user sees and the
    file's own name (``Start image: x.png is not a readable image ...``), for the page and for API
    clients alike; a plain ``gr.Image`` fails inside gradio with a message that names neither."""

    def get_block_name(self) -> str:
        return "image"  # the browser draws it as the ordinary image component

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except Exception as e:  # noqa: BLE001 - whatever PIL makes of a bad file
            name = getattr(payload, "orig_name", None) or Path(str(getattr(payload, "path", "") or "")).name
            raise gr.Error(f"{self.label}: {printable_name(name)} is not a readable image (PNG, JPEG, WebP...): "
                           f"{type(e).__name__}", print_exception=False) from None


def printable_name(name: str) -> str:
    """A file name as a message may show it: printable, at most 80 characters."""
    text = "".join(ch if ch.isprintable() else "?" for ch in str(name))
    return text if len(text) <= 80 else text[:77] + "..."


def model_choices(state: AppState) -> list[tuple[str, str]]:
    """(label, id) of every model; the label says whether it is ready on this machine (its files
    present, found in the models folders, or made on first use) or what is missing."""
    from wan.registry import list_models
    out = []
    for spec in list_models(include_test=True):
        label = f"{spec.display_name} [test model]" if spec.test_model else spec.display_name
        ready = state.readiness(spec, estimate=True)
        mark = ("✓ " if ready.ready else "⬇ ") + ready.summary()
        out.append((f"{label} · {mark}", spec.id))
    return out


def profile_choices() -> list[tuple[str, str]]:
    from wan.optim.profile_files import load_profiles
    return [(p.label, p.name) for p in load_profiles()]


def visible_inputs(task: str) -> set[str]:
    """The input controls a task shows (see ``TASK_INPUTS`` of the request)."""
    shown = set(TASK_INPUTS.get(task, ()))
    if "video" in shown:
        shown.add("strength")
    if task == "vace":
        shown.add("vace_scale")
    return shown


def render(state: AppState) -> dict[str, gr.components.Component]:
    """Builds the form inside the current Blocks context and returns its controls by key."""
    c: dict[str, gr.components.Component] = {}
    s = state.settings
    models = model_choices(state)
    first = s.model if s.model in {m for _, m in models} else next((m for _, m in models if not m.startswith("test")),
                                                                    models[0][1])
    with gr.Row():
        c["model"] = gr.Dropdown(models, value=first, label="Model", elem_id="model", scale=3)
        c["task"] = gr.Dropdown([], label="Task", elem_id="task", scale=1)
        c["profile"] = gr.Dropdown(profile_choices(), value=s.profile or "default", label="Profile",
                                   elem_id="profile", scale=2)
    with gr.Row():
        c["readiness"] = gr.Markdown("", elem_id="readiness")
        c["download"] = gr.Button("⬇ Download the missing files", visible=False, elem_id="download-model", scale=0,
                                  min_width=160)
    c["plan"] = gr.Markdown("", elem_id="plan")
    c["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id="prompt", placeholder="A fox walking in the snow ...")
    c["one_per_line"] = gr.Checkbox(False, label="One job per prompt line", elem_id="one-per-line")
    c["negative_prompt"] = gr.Textbox(label="Negative prompt (empty: the model's default)", lines=1,
                                      elem_id="negative-prompt")
    with gr.Row():
        for key in ("image", "end_image"):
            c[key] = CheckedImage(type="filepath", label=INPUT_LABELS[key], elem_id=key.replace("_", "-"), visible=False)
        for key in ("video", "control_video", "mask_video"):
            c[key] = gr.Video(label=INPUT_LABELS[key], elem_id=key.replace("_", "-"), visible=False)
        c["ref_images"] = gr.File(file_count="multiple", file_types=["image"], label=INPUT_LABELS["ref_images"],
                                  elem_id="ref-images", visible=False)
    with gr.Row():
        c["strength"] = gr.Slider(0.05, 1.0, request_default("strength"), step=0.05,
                                  label="Video strength (how much is re-noised)", visible=False, elem_id="strength")
        c["vace_scale"] = gr.Slider(0.0, 2.0, request_default("vace_scale"), step=0.05, label="Control strength",
                                    visible=False)
    with gr.Row():
        c["resolution"] = gr.Dropdown([], label="Resolution", elem_id="resolution")
        c["width"] = gr.Number(label="Width", precision=0, visible=False, elem_id="width")
        c["height"] = gr.Number(label="Height", precision=0, visible=False, elem_id="height")
        c["frames"] = gr.Number(label="Frames", precision=0, elem_id="frames")
        c["duration"] = gr.Markdown("", elem_id="duration")
    with gr.Row():
        c["steps"] = gr.Number(label="Steps", precision=0, elem_id="steps")
        c["guidance"] = gr.Number(label="Guidance", elem_id="guidance")
        c["guidance_high_noise"] = gr.Number(label="Guidance (high-noise expert)", visible=False,
                                             elem_id="guidance-high-noise")
        c["boundary"] = gr.Number(label="Expert switch (fraction of 1000)", visible=False, elem_id="boundary")
        c["shift"] = gr.Number(label="Shift", elem_id="shift")
        c["sampler"] = gr.Dropdown(list(SAMPLERS), label="Sampler", elem_id="sampler")
    with gr.Row():
        c["seed"] = gr.Number(request_default("seed"), label="Seed (-1: random)", precision=0, elem_id="seed")
        random_seed = gr.Button("Random", elem_id="random-seed", scale=0, min_width=90)
        c["fps"] = gr.Number(label="FPS", precision=0, elem_id="fps")
        c["quality"] = gr.Slider(0, 10, request_default("quality"), step=1, label="Video quality", elem_id="quality")
    c["random_seed"] = random_seed
    saver = saver_defaults()
    with gr.Accordion("Advanced: step savers and per-job profile overrides", open=False):
        with gr.Row():
            c["teacache"] = gr.Dropdown(list(PICKER_CHOICES["teacache"]), value=KEEP, label="TeaCache")
            c["teacache_speedup"] = gr.Number(saver["teacache_speedup"], label="TeaCache target speed-up")
            c["magcache"] = gr.Dropdown(list(PICKER_CHOICES["magcache"]), value=KEEP,
                                        label="MagCache (a model's first MagCache run records its table)")
            c["magcache_speedup"] = gr.Number(saver["magcache_speedup"], label="MagCache target speed-up")
        with gr.Row():
            c["slg_mode"] = gr.Dropdown(list(PICKER_CHOICES["slg_mode"]), value=KEEP, label="Skip-layer guidance")
            c["slg_layers"] = gr.Textbox(saver["slg_layers"], label="SLG layers")
            c["slg_scale"] = gr.Number(saver["slg_scale"], label="SLG scale")
            c["slg_start"] = gr.Number(saver["slg_start"], label="SLG start")
            c["slg_end"] = gr.Number(saver["slg_end"], label="SLG end")
        with gr.Row():
            c["cfg_skip_mode"] = gr.Dropdown(list(PICKER_CHOICES["cfg_skip_mode"]), value=KEEP, label="CFG skipping")
            c["cfg_skip_ratio"] = gr.Number(saver["cfg_skip_ratio"], label="CFG apply ratio")
            c["cfg_zero_star"] = gr.Dropdown(list(PICKER_CHOICES["cfg_zero_star"]), value=KEEP, label="CFG-Zero*")
            c["cfg_zero_init_steps"] = gr.Number(saver["cfg_zero_init_steps"], precision=0, label="Zero-init steps")
            c["riflex"] = gr.Dropdown(list(PICKER_CHOICES["riflex"]), value=KEEP, label="RIFLEx (long clips)")
        c["extra"] = gr.State({})  # request fields without a control, kept from loaded settings
        c["overrides"] = gr.Textbox(label="More profile overrides, one KEY=VALUE per line "
                                          "(e.g. memory.offload=blocks)", lines=2, elem_id="overrides")
    return c


def form_keys(c: dict) -> list[str]:
    """The keys whose values make a request (everything but display-only parts)."""
    return [k for k in c if k not in ("plan", "duration", "random_seed", "readiness", "download")]


def readiness_updates(state: AppState, model_id: str) -> list:
    """The readiness text under the picker and the Download button (shown when files are missing)."""
    from wan.app.downloads import readiness_text
    text = readiness_text(state, model_id)
    return [text, gr.update(visible=text.startswith("⬇"))]


def apply_model(state: AppState, model_id: str, task: str | None = None) -> dict:
    """Form updates for a model change: its tasks, sizes and defaults."""
    from wan.registry import get_model
    spec = get_model(model_id)
    task = task if task in spec.tasks else spec.tasks[0]
    d = spec.defaults
    w, h = spec.default_size
    updates = {
        "task": gr.update(choices=list(spec.tasks), value=task),
        "resolution": gr.update(choices=resolution_choices(spec.sizes), value=f"{w}x{h}"),
        "width": gr.update(value=w, visible=False), "height": gr.update(value=h, visible=False),
        "frames": gr.update(value=1 if task == "t2i" else d.frames), "steps": d.steps, "guidance": d.guidance,
        "guidance_high_noise": gr.update(value=d.guidance_high_noise, visible=spec.is_two_expert),
        "boundary": gr.update(value=d.boundary, visible=spec.is_two_expert),
        "shift": d.shift_for((w, h)), "sampler": d.sampler, "fps": d.fps,
    }
    updates.update(task_updates(task))
    return updates


def task_updates(task: str) -> dict:
    shown = visible_inputs(task)
    return {k: gr.update(visible=k in shown) for k in TASK_INPUT_FIELDS}


def duration_text(frames, fps) -> str:
    try:
        return f"{int(frames)} frames at {int(fps)} fps = {int(frames) / int(fps):.2f} s"
    except (TypeError, ValueError, ZeroDivisionError):
        return ""


def plan_text(state: AppState, model_id: str, profile_name: str) -> str:
    """The profile's memory plan on this machine in plain words (as ``wgp.py profiles`` prints)."""
    from wan.optim.machine import detect_machine
    from wan.optim.planner import describe, model_sizes, plan, run_precision
    from wan.optim.profile_files import load_profiles
    from wan.registry import get_model
    try:
        profiles = load_profiles()
        profile = profiles.get(profile_name or "default")
        spec = get_model(model_id)
        if spec.test_model:
            return f"**{profile.label}**: {profile.description}\n\nTEST model: a few MB, it fits anywhere."
        machine = detect_machine()
        sizes = model_sizes(spec, run_precision(profile, machine))
        text = describe(plan(profile, sizes, machine, profiles))
    except Exception as e:  # the plan is information: a failure shows, never breaks the form
        return f"Memory plan unavailable: {e}"
    return f"**{profile.label}** on {machine}: {profile.description}\n\n```\n{text}\n```"


def collect(state: AppState, keys: list[str], args: tuple) -> list:
    """Form values -> checked requests (uploads copied in). A refused upload or input file is a
    ValueError in the words the user sees (the field's label and the file's own name); any other
    refusal a RequestError naming the field."""
    from wan.app.security import accept_request, store_upload
    values = dict(zip(keys, args))
    max_bytes = state.settings.max_upload_mb * 2**20
    shown_names: dict[str, str] = {}  # stored upload -> the name the user gave the file
    for key, kind in UPLOAD_KINDS.items():
        v = values.get(key)
        if not v:
            continue
        paths = [getattr(f, "name", f) for f in v] if isinstance(v, list) else [v]
        kept = []
        for p in paths:
            if state.is_ours(p):
                kept.append(p)
                continue
            try:
                stored = str(store_upload(p, state.uploads_dir, kind, max_bytes))
            except ValueError as e:
                raise ValueError(f"{INPUT_LABELS[key]}: {e}") from None
            shown_names[stored] = Path(str(p)).name
            kept.append(stored)
        values[key] = kept if key == "ref_images" else kept[0]
    requests = form_to_requests(values)
    for r in requests:
        try:
            accept_request(r, state)  # fail now, in the form, not later in the queue
        except RequestError as e:
            if e.field not in INPUT_LABELS or not isinstance(e.value, str):
                raise
            name = shown_names.get(e.value, Path(e.value).name)
            raise ValueError(f"{INPUT_LABELS[e.field]}: {printable_name(name)} is not usable: {e.allowed}") from None
    return requests


def listen(state: AppState, c: dict, on_added) -> SimpleNamespace:
    """Wires the form's own events and returns ``add`` (the "Add to queue" handler, taking the
    session id, the queue's shown choices and the form values in ``keys`` order) and ``on_model``
    for the page's load event.
    ``on_added(session, shown)`` returns the queue view updates after jobs are added."""
    keys = form_keys(c)
    model_outputs = ["task", "resolution", "width", "height", "frames", "steps", "guidance",
                     "guidance_high_noise", "boundary", "shift", "sampler", "fps", *TASK_INPUT_FIELDS]

    def on_model(model_id, task):
        u = apply_model(state, model_id, task)
        return [u[k] for k in model_outputs]
    # .input, not .change: loading earlier settings sets the model too, and must not reset the form
    c["model"].input(on_model, [c["model"], c["task"]], [c[k] for k in model_outputs])
    c["task"].input(lambda t: [task_updates(t)[k] for k in TASK_INPUT_FIELDS], c["task"],
                     [c[k] for k in TASK_INPUT_FIELDS])
    c["resolution"].change(lambda r: [gr.update(visible=r == CUSTOM)] * 2, c["resolution"], [c["width"], c["height"]])
    for k in ("frames", "fps"):
        c[k].change(duration_text, [c["frames"], c["fps"]], c["duration"])
    for k in ("model", "profile"):
        c[k].change(lambda m, p: plan_text(state, m, p), [c["model"], c["profile"]], c["plan"])
    c["model"].change(lambda m: readiness_updates(state, m), c["model"], [c["readiness"], c["download"]])
    c["random_seed"].click(lambda: -1, None, c["seed"])

    def add(session_id, shown, *args):
        jobs = []
        try:
            for r in collect(state, keys, args):
                jobs.append(state.queue.add(r.to_dict(), session_id))
        except (RequestError, ValueError) as e:
            done = f" ({len(jobs)} queued before it: {', '.join(j.id for j in jobs)})" if jobs else ""
            return [f"⚠️ {e}{done}", *on_added(session_id, shown)]
        names = ", ".join(j.id for j in jobs)
        return [f"Queued {len(jobs)} job{'s' if len(jobs) > 1 else ''}: {names}", *on_added(session_id, shown)]

    def download(session_id, shown, model_id):
        from wan.app.downloads import queue_download
        try:
            job = queue_download(state, model_id, session_id)
        except ValueError as e:
            return [f"⚠️ {e}", *on_added(session_id, shown)]
        return [f"Queued {job.label} as job {job.id}: its progress shows in the queue", *on_added(session_id, shown)]
    return SimpleNamespace(keys=keys, add=add, download=download, on_model=on_model, model_outputs=model_outputs)


def load_into_form(state: AppState, c: dict, request) -> list:
    """Updates that put an earlier request's settings into the form (model first, then values)."""
    from wan.registry import get_model
    keys = form_keys(c)
    spec = get_model(request.model)
    values = request_to_form(request, spec.sizes)
    model_updates = apply_model(state, spec.id, request.task)
    out = []
    for k in keys:
        u = model_updates.get(k)
        if k in values:
            v = values[k]
            if k == "extra":
                out.append(v)  # a State takes the value itself
            elif k in ("width", "height"):
                out.append(gr.update(value=v, visible=values["resolution"] == CUSTOM))
            elif isinstance(u, dict):
                out.append({**u, "value": v})
            else:
                out.append(gr.update(value=v))
        else:
            out.append(u if u is not None else gr.update())
    return out

