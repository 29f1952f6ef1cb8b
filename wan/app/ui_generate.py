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
    NAG_FIELDS,
    WINDOW_FIELDS,
    form_to_requests,
    request_to_form,
    resolution_choices,
    saver_defaults,
    task_inputs,
)
from wan.app.state import AppState
from wan.app.ui_phases import PHASE_FIELDS, PHASE_INFO, RECIPE_FIELDS, phase_updates, recipe_updates
from wan.app.words import literal
from wan.engine.request import SAMPLERS, TASK_INPUTS, RequestError, request_default
from wan.engine.window_plan import COLOR_CORRECTIONS, MAX_OVERLAP_NOISE, SEAMS, window_count

# inputs of each task, in the order they are shown (request field names)
TASK_INPUT_FIELDS = ("image", "end_image", "video", "strength", "control_video", "mask_video", "ref_images",
                     "vace_scale", "continue_video", "sliding_window_overlap_noise")
INPUT_LABELS = {"image": "Start image", "end_image": "End image", "video": "Input video",
                "control_video": "Control video", "mask_video": "Mask video", "ref_images": "Reference images",
                "continue_video": "Video to continue"}
# One line per step-saver control, in the page's words (shown under each control).
SAVER_INFO = {
    "teacache": "Reuses the DiT's output on steps whose input barely changed: faster, slightly softer detail.",
    "teacache_speedup": "How much faster to aim for: 2.0 is about twice as fast.",
    "magcache": "Like TeaCache, with a recorded error table per model (its first run records it).",
    "magcache_speedup": "How much faster to aim for: 2.0 is about twice as fast.",
    "slg_mode": "Leaves some DiT blocks out of the unconditioned pass: can sharpen structure and motion.",
    "slg_layers": "Which blocks to leave out, as numbers (e.g. 9, or 8,9).",
    "slg_scale": "How strongly skip-layer guidance pushes.",
    "slg_start": "Where it starts, as a fraction of the steps (0: the first step).",
    "slg_end": "Where it ends, as a fraction of the steps (1: the last step).",
    "cfg_skip_mode": "Skips the unconditioned pass on some steps: faster, follows the prompt less there.",
    "cfg_skip_ratio": "The fraction of steps that keep full guidance.",
    "cfg_zero_star": "Rescales guidance and zeroes the first steps: steadier colours and motion.",
    "cfg_zero_init_steps": "How many first steps it zeroes.",
    "riflex": "Keeps clips longer than the model was trained on from looping back; auto turns it on then.",
}
DEFAULT_PROFILE = "auto"  # what a newcomer gets: the numbered profile that fits this machine and model
UPLOAD_KINDS = {"image": "image", "end_image": "image", "video": "video", "control_video": "video",
                "mask_video": "video", "ref_images": "image", "continue_video": "video"}
# what the duration under the frames depends on
DURATION_INPUTS = ("frames", "fps", "sliding_window_size", "sliding_window_overlap",
                   "sliding_window_discard_last_frames", "continue_video")
WINDOWS_HELP = ("A clip longer than the window is made window by window into one file, each window starting from "
                "the last frames of the one before (the overlap); one prompt per line, or separated by `[/window]`, "
                "gives each window its own. A video to continue (an upload or an earlier output) is the start: "
                "the new frames follow it in the output.")


class BadUpload(str):
    """What a :class:`CheckedImage` hands on for a file that is no image: the message in the user's
    words. The upload check shows it and clears the control; "Add to queue" refuses it."""


class CheckedImage(gr.Image):
    """An image input whose unreadable upload becomes a :class:`BadUpload` naming the label the user
    sees and the file's own name (``Start image: x.png is not a readable image ...``), instead of
    an error inside gradio that names neither (and shows only a red "Error" badge)."""

    def get_block_name(self) -> str:
        return "image"  # the browser draws it as the ordinary image component

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except Exception:  # noqa: BLE001 - whatever PIL makes of a bad file
            path = Path(str(getattr(payload, "path", "") or ""))
            name = getattr(payload, "orig_name", None) or path.name
            return BadUpload(image_refusal(self.label, name, path))


def image_refusal(label: str, name: str, path: Path | None = None) -> str:
    if path is not None and path.is_file() and path.stat().st_size == 0:
        return f"{label}: {printable_name(name)} is empty (0 bytes)"
    return f"{label}: {printable_name(name)} is not a readable image (PNG, JPEG, WebP…)"


def upload_problem(key: str, value) -> str | None:
    """Why an upload to the control ``key`` cannot be used, in the user's words (its label, the file's
    own name), or None. Checked when the file arrives, from its header: an empty file, an image PIL
    cannot read, a video with no video stream."""
    from wan.engine.media_probe import probe_image, probe_video
    if isinstance(value, BadUpload):
        return str(value)
    label = INPUT_LABELS[key]
    for item in (value if isinstance(value, list) else [value]):
        path = Path(str(getattr(item, "name", item)))
        name = printable_name(path.name)
        if not path.is_file():
            return f"{label}: {name} did not arrive; upload it again"
        if path.stat().st_size == 0:
            return f"{label}: {name} is empty (0 bytes)"
        try:
            probe_image(path) if UPLOAD_KINDS[key] == "image" else probe_video(path)
        except ValueError as e:
            if UPLOAD_KINDS[key] == "image":
                return image_refusal(label, path.name)
            reason = str(e).removeprefix(f"{path}: ")
            if reason.startswith("cannot read"):
                reason = "is not a readable video (MP4, WebM, MOV, MKV…)"
            return f"{label}: {name} {reason}"
    return None


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
        shown.update(("vace_scale", "sliding_window_overlap_noise"))
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
        # allow_custom_value: a model switch changes the task list while the browser may still send the
        # previous model's task with an event; the handlers check the value themselves (task_of)
        c["task"] = gr.Dropdown([], label="Task", elem_id="task", scale=1, allow_custom_value=True)
        c["profile"] = gr.Dropdown(profile_choices(), value=s.profile or DEFAULT_PROFILE, label="Profile",
                                   elem_id="profile", scale=2)
        c["reset"] = gr.Button("Reset to defaults", elem_id="reset-form", scale=0, min_width=120, size="sm")
    with gr.Row():
        c["readiness"] = gr.Markdown("", elem_id="readiness")
        c["download"] = gr.Button("⬇ Download the missing files", visible=False, elem_id="download-model", scale=0,
                                  min_width=160)
    c["plan"] = gr.Markdown("", elem_id="plan")
    c["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id="prompt", placeholder="A fox walking in the snow ...")
    # each model's form as last edited, kept in this browser (restored on reload and on a model switch)
    c["memory"] = gr.BrowserState({}, storage_key="wan_studio_forms")
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
    c["upload_message"] = gr.Markdown("", elem_id="upload-message")
    with gr.Row():
        c["strength"] = gr.Slider(0.05, 1.0, request_default("strength"), step=0.05,
                                  label="Video strength (how much is re-noised)", visible=False, elem_id="strength")
        c["vace_scale"] = gr.Slider(0.0, 2.0, request_default("vace_scale"), step=0.05, label="Control strength",
                                    visible=False)
    with gr.Row():
        c["resolution"] = gr.Dropdown([], label="Resolution", elem_id="resolution", allow_custom_value=True)
        c["width"] = gr.Number(label="Width", precision=0, visible=False, elem_id="width")
        c["height"] = gr.Number(label="Height", precision=0, visible=False, elem_id="height")
        c["frames"] = gr.Number(label="Frames", precision=0, elem_id="frames")
        c["duration"] = gr.Markdown("", elem_id="duration")
    with gr.Row():
        c["steps"] = gr.Number(label="Steps", precision=0, elem_id="steps")
        c["guidance"] = gr.Number(label="Guidance", elem_id="guidance")
        c["guidance_high_noise"] = gr.Number(label="Guidance (high-noise expert)", visible=False,
                                             elem_id="guidance-high-noise")
        c["boundary"] = gr.Number(label="Expert switch (noise level 0-1)", visible=False, elem_id="boundary",
                                  info="where the low-noise expert takes over, e.g. 0.875")
        c["shift"] = gr.Number(label="Shift", elem_id="shift")
        c["sampler"] = gr.Dropdown(list(SAMPLERS), label="Sampler", elem_id="sampler")
    with gr.Row():  # guidance phases (Wan2GP's): the fields of phases 2 and 3 show when there are that many
        c["guidance_phases"] = gr.Number(label="Guidance phases (1-3)", precision=0, elem_id="guidance-phases",
                                         info=PHASE_INFO["guidance_phases"])
        c["switch_threshold"] = gr.Number(label="Phase 2 starts below timestep", visible=False,
                                          elem_id="switch-threshold", info=PHASE_INFO["switch_threshold"])
        c["guidance2_scale"] = gr.Number(label="Guidance, phase 2", visible=False, elem_id="guidance2-scale",
                                         info=PHASE_INFO["guidance2_scale"])
        c["switch_threshold2"] = gr.Number(label="Phase 3 starts below timestep", visible=False,
                                           elem_id="switch-threshold2", info=PHASE_INFO["switch_threshold2"])
        c["guidance3_scale"] = gr.Number(label="Guidance, phase 3", visible=False, elem_id="guidance3-scale",
                                         info=PHASE_INFO["guidance2_scale"])
        c["model_switch_phase"] = gr.Number(label="Low-noise expert after phase", precision=0, visible=False,
                                            elem_id="model-switch-phase", info=PHASE_INFO["model_switch_phase"])
    with gr.Row():  # NAG: the negative prompt steers inside the prompt's own pass (guidance 1 has no other)
        c["nag_scale"] = gr.Number(request_default("nag_scale"), label="NAG scale (1: off)", elem_id="nag-scale",
                                   info="a negative prompt that works at guidance 1 (few-step profiles); e.g. 9")
        c["nag_tau"] = gr.Number(request_default("nag_tau"), label="NAG tau", elem_id="nag-tau",
                                 info="the most a token's guided attention may grow (1 to 10)")
        c["nag_alpha"] = gr.Number(request_default("nag_alpha"), label="NAG alpha", elem_id="nag-alpha",
                                   info="how much of the guided attention is blended in (0 to 1)")
    with gr.Row():
        c["seed"] = gr.Number(request_default("seed"), label="Seed (-1: random)", precision=0, elem_id="seed")
        random_seed = gr.Button("Random", elem_id="random-seed", scale=0, min_width=90)
        c["fps"] = gr.Number(label="FPS", precision=0, elem_id="fps")
        c["quality"] = gr.Slider(0, 10, request_default("quality"), step=1, label="Video quality", elem_id="quality")
    c["random_seed"] = random_seed
    with gr.Accordion("Long videos: sliding windows, continuing a video", open=False, elem_id="windows") as box:
        c["windows_box"] = box  # opened by the gallery's "Continue this video"
        gr.Markdown(WINDOWS_HELP)
        with gr.Row():
            c["sliding_window_size"] = gr.Number(request_default("sliding_window_size"), precision=0,
                                                 label="Window size (frames, 4k+1; 0: one run)",
                                                 elem_id="sliding-window-size")
            c["sliding_window_overlap"] = gr.Number(request_default("sliding_window_overlap"), precision=0,
                                                    label="Overlap frames", elem_id="sliding-window-overlap")
            c["sliding_window_discard_last_frames"] = gr.Number(request_default("sliding_window_discard_last_frames"),
                                                                precision=0, label="Discard last frames")
            c["sliding_window_seam"] = gr.Dropdown(list(SEAMS), value=request_default("sliding_window_seam"),
                                                   label="Seams")
            c["sliding_window_color_correction"] = gr.Dropdown(
                list(COLOR_CORRECTIONS), value=request_default("sliding_window_color_correction"),
                label="Colour correction")
            c["sliding_window_color_correction_strength"] = gr.Slider(
                0.0, 1.0, request_default("sliding_window_color_correction_strength"), step=0.05,
                label="Colour correction strength (0: off)")
        c["sliding_window_overlap_noise"] = gr.Slider(
            0, MAX_OVERLAP_NOISE, request_default("sliding_window_overlap_noise"), step=1, visible=False,
            label="Overlap noise (VACE, thousandths; Wan2GP's default 20)", elem_id="overlap-noise",
            info="Fresh noise in the overlap's control at every step: less blur at the seams, held less exactly.")
        c["continue_video"] = gr.Video(label=INPUT_LABELS["continue_video"], elem_id="continue-video", visible=False)
    saver = saver_defaults()
    with gr.Accordion("Advanced: step savers and per-job profile overrides", open=False):
        gr.Markdown("Each choice left at **profile** keeps what the profile says. Step savers trade a little "
                    "fidelity for speed; the numbers apply only when their switch is not *profile*.")
        with gr.Row():
            c["teacache"] = gr.Dropdown(list(PICKER_CHOICES["teacache"]), value=KEEP, label="TeaCache",
                                        info=SAVER_INFO["teacache"])
            c["teacache_speedup"] = gr.Number(saver["teacache_speedup"], label="TeaCache target speed-up",
                                              info=SAVER_INFO["teacache_speedup"])
            c["magcache"] = gr.Dropdown(list(PICKER_CHOICES["magcache"]), value=KEEP, label="MagCache",
                                        info=SAVER_INFO["magcache"])
            c["magcache_speedup"] = gr.Number(saver["magcache_speedup"], label="MagCache target speed-up",
                                              info=SAVER_INFO["magcache_speedup"])
        with gr.Row():
            c["slg_mode"] = gr.Dropdown(list(PICKER_CHOICES["slg_mode"]), value=KEEP, label="Skip-layer guidance",
                                        info=SAVER_INFO["slg_mode"])
            c["slg_layers"] = gr.Textbox(saver["slg_layers"], label="SLG layers", info=SAVER_INFO["slg_layers"])
            c["slg_scale"] = gr.Number(saver["slg_scale"], label="SLG scale", info=SAVER_INFO["slg_scale"])
            c["slg_start"] = gr.Number(saver["slg_start"], label="SLG start", info=SAVER_INFO["slg_start"])
            c["slg_end"] = gr.Number(saver["slg_end"], label="SLG end", info=SAVER_INFO["slg_end"])
        with gr.Row():
            c["cfg_skip_mode"] = gr.Dropdown(list(PICKER_CHOICES["cfg_skip_mode"]), value=KEEP, label="CFG skipping",
                                             info=SAVER_INFO["cfg_skip_mode"])
            c["cfg_skip_ratio"] = gr.Number(saver["cfg_skip_ratio"], label="CFG apply ratio",
                                            info=SAVER_INFO["cfg_skip_ratio"])
            c["cfg_zero_star"] = gr.Dropdown(list(PICKER_CHOICES["cfg_zero_star"]), value=KEEP, label="CFG-Zero*",
                                             info=SAVER_INFO["cfg_zero_star"])
            c["cfg_zero_init_steps"] = gr.Number(saver["cfg_zero_init_steps"], precision=0, label="Zero-init steps",
                                                 info=SAVER_INFO["cfg_zero_init_steps"])
            c["riflex"] = gr.Dropdown(list(PICKER_CHOICES["riflex"]), value=KEEP, label="RIFLEx (long clips)",
                                      info=SAVER_INFO["riflex"])
        c["extra"] = gr.State({})  # request fields without a control, kept from loaded settings
        c["overrides"] = gr.Textbox(label="More profile overrides, one KEY=VALUE per line "
                                          "(e.g. memory.offload=blocks)", lines=2, elem_id="overrides")
    return c


def form_keys(c: dict) -> list[str]:
    """The keys whose values make a request (everything but display-only parts)."""
    return [k for k in c if k not in DISPLAY_ONLY]


# parts of the form that make no request: shown text, buttons, the browser's memory of the form
DISPLAY_ONLY = ("plan", "duration", "random_seed", "readiness", "download", "upload_message", "memory", "reset",
                "windows_box")
# form keys not remembered per model: uploads (their files may be gone), LoRAs (the folder changes),
# the hidden extra fields, and the model itself (the memory's key)
NOT_REMEMBERED = (*UPLOAD_KINDS, "extra", "loras", "lora_multipliers", "model")


def remembered_keys(keys: list[str]) -> list[str]:
    return [k for k in keys if k not in NOT_REMEMBERED]


def remember(memory, model_id, rkeys: list[str], values) -> dict:
    """The browser's memory with ``model_id``'s form replaced by ``values`` (in ``rkeys`` order) and
    the model marked as the last one used."""
    memory = memory if isinstance(memory, dict) else {}
    forms = dict(memory.get("forms") or {}) if isinstance(memory.get("forms"), dict) else {}
    if isinstance(model_id, str):
        forms[model_id] = {k: v for k, v in zip(rkeys, values) if _plain(v)}
    return {"model": model_id, "forms": forms}


def last_model(memory, fallback: str) -> str:
    """The model this browser used last (its memory), when the registry still has it; else ``fallback``."""
    from wan.registry import default_registry
    model_id = memory.get("model") if isinstance(memory, dict) else None
    return model_id if isinstance(model_id, str) and model_id in default_registry() else fallback


def forget(memory, model_id) -> dict:
    """The memory without ``model_id``'s form ("Reset to defaults")."""
    memory = memory if isinstance(memory, dict) else {}
    forms = {k: v for k, v in (memory.get("forms") or {}).items() if k != model_id} \
        if isinstance(memory.get("forms"), dict) else {}
    return {"model": model_id, "forms": forms}


def _plain(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def remembered_form(model_id: str, memory) -> dict:
    """``model_id``'s remembered form values that still fit the form (the browser's storage is the
    user's to edit: a value of the wrong kind, or a choice no longer offered, is dropped)."""
    from wan.optim.profile_files import load_profiles
    from wan.registry import RegistryError, get_model
    forms = memory.get("forms") if isinstance(memory, dict) else None
    saved = forms.get(model_id) if isinstance(forms, dict) else None
    if not isinstance(saved, dict):
        return {}
    try:
        spec = get_model(model_id)
    except (RegistryError, TypeError):
        return {}
    choices = {"task": spec.tasks, "resolution": resolution_choices(spec.sizes), "sampler": list(SAMPLERS),
               "sliding_window_seam": SEAMS, "sliding_window_color_correction": COLOR_CORRECTIONS,
               "profile": [p.name for p in load_profiles()], **{k: v for k, v in PICKER_CHOICES.items()}}
    texts = ("prompt", "negative_prompt", "slg_layers", "overrides")
    out = {}
    for k, v in saved.items():
        if k in choices:
            ok = v in choices[k]
        elif k in texts:
            ok = isinstance(v, str)
        elif k == "one_per_line":
            ok = isinstance(v, bool)
        else:
            ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
        if ok:
            out[k] = v
    return out


def form_for_model(state: AppState, model_id: str, task: str | None, memory) -> dict:
    """Updates for the form of ``model_id``: its remembered values over its defaults (the task's
    inputs shown or hidden to match)."""
    saved = remembered_form(model_id, memory)
    updates = apply_model(state, model_id, saved.get("task", task))
    for k, v in saved.items():
        u = updates.get(k)
        updates[k] = {**u, "value": v} if isinstance(u, dict) else gr.update(value=v)
    for k, u in phase_updates(saved.get("guidance_phases"), model_id).items():  # the remembered phases show
        updates[k] = {**updates.get(k, gr.update()), **u}
    custom = saved.get("resolution") == CUSTOM
    for k in ("width", "height"):
        if k in saved or custom:
            updates[k] = gr.update(value=saved.get(k, updates[k].get("value") if isinstance(updates[k], dict) else None),
                                   visible=custom)
    return updates


def default_form(state: AppState, model_id: str) -> dict:
    """Updates that put every remembered control back to its default for ``model_id``."""
    saver = saver_defaults()
    updates = apply_model(state, model_id, None)
    updates.update(prompt="", negative_prompt="", one_per_line=False, seed=request_default("seed"),
                   quality=request_default("quality"), profile=state.settings.profile or DEFAULT_PROFILE,
                   overrides="", strength=request_default("strength"), vace_scale=request_default("vace_scale"),
                   **{k: request_default(k) for k in (*WINDOW_FIELDS, *NAG_FIELDS)},
                   **{k: KEEP for k in PICKER_CHOICES}, **saver)
    return updates


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
        "guidance_phases": None, **{k: gr.update(value=None) for k in PHASE_FIELDS},
    }
    for k, u in phase_updates(None, model_id).items():
        updates[k] = gr.update(value=None, visible=u["visible"])
    updates.update(task_updates(task))
    return updates


def task_of(model_id, task) -> str | None:
    """``task`` when the model has it, else the model's first task (None for an unknown model)."""
    from wan.registry import RegistryError, get_model
    try:
        tasks = get_model(model_id).tasks
    except (RegistryError, TypeError):
        return None
    return task if task in tasks else tasks[0]


def task_updates(task: str) -> dict:
    shown = visible_inputs(task)
    return {k: gr.update(visible=k in shown) for k in TASK_INPUT_FIELDS}


def duration_text(frames, fps, size=0, overlap=None, discard=0, continued=None) -> str:
    """The clip's length in words; with sliding windows, how many; with a video to continue, the
    total duration of the output (that video's frames, then the new ones)."""
    try:
        frames, fps = int(frames), int(fps)
        text = f"{frames} frames at {fps} fps = {frames / fps:.2f} s"
    except (TypeError, ValueError, ZeroDivisionError):
        return ""
    try:
        size, discard = int(size or 0), int(discard or 0)
        overlap = int(overlap if overlap is not None else request_default("sliding_window_overlap"))
        if 0 < size < frames and size - overlap - discard > 0:
            text += f" · {window_count(frames, size, overlap, discard)} windows of up to {size} frames"
    except (TypeError, ValueError):
        pass
    if continued:
        from wan.engine.media_probe import probe_video
        try:
            before = probe_video(str(continued))[2]
        except (OSError, ValueError):
            before = None
        if before:
            total = before + frames
            text += f" · after the {before} frames continued: {total} frames = {total / fps:.2f} s in all"
    return text


def plan_text(state: AppState, model_id: str, profile_name: str) -> str:
    """The profile's memory plan on this machine: a one-line verdict first (it fits, or which profile
    would), then the plan in plain words (as ``wgp.py profiles`` prints it), as lines that wrap."""
    from wan.optim.machine import detect_machine
    from wan.optim.planner import describe, model_sizes, plan, resolve_auto, run_precision
    from wan.optim.profile_files import load_profiles
    from wan.registry import get_model
    try:
        profiles = load_profiles()
        profile = profiles.get(profile_name or DEFAULT_PROFILE)
        spec = get_model(model_id)
        if spec.test_model:
            return f"✓ **Fits.** **{profile.label}**: {profile.description}\n\nTEST model: a few MB, it fits anywhere."
        machine = detect_machine()
        sizes = model_sizes(spec, run_precision(profile, machine))
        result = plan(profile, sizes, machine, profiles)
        if result.fits:
            verdict = f"✓ **Fits** on this machine with {result.profile}."
        else:
            _, chosen, _ = resolve_auto(profiles.get("auto"), sizes, machine, profiles)
            fits = plan(chosen, model_sizes(spec, run_precision(chosen, machine)), machine, profiles).fits
            verdict = (f"✗ **Does not fit** with {profile.label}: profile **{chosen.label}** fits (or pick auto)."
                       if fits else f"✗ **Does not fit** with {profile.label}, nor with any numbered profile: "
                                    "see what is short below.")
        text = describe(result)
    except Exception as e:  # the plan is information: a failure shows, never breaks the form
        return f"Memory plan unavailable: {e}"
    lines = "\n".join(f"- {line.strip()}" for line in text.splitlines()[1:] if line.strip())
    return f"{verdict}\n\n**{profile.label}**: {profile.description}\n\n{lines}"


def collect(state: AppState, keys: list[str], args: tuple) -> list:
    """Form values -> checked requests (uploads copied in). A refused upload or input file is a
    ValueError in the words the user sees (the field's label and the file's own name); any other
    refusal a RequestError naming the field."""
    from wan.app.security import accept_request, store_upload
    values = dict(zip(keys, args))
    max_bytes = state.settings.max_upload_mb * 2**20
    shown_names: dict[str, str] = {}  # stored upload -> the name the user gave the file
    taken = task_inputs(values.get("task"))
    for key, kind in UPLOAD_KINDS.items():
        v = values.get(key)
        if not v or (taken is not None and key not in taken):
            continue  # an input of another task stays in its hidden control, unsent and unchecked
        if isinstance(v, BadUpload):
            raise ValueError(str(v))
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
            if e.field not in INPUT_LABELS:
                raise
            if not isinstance(e.value, str):  # none given where the task needs one
                raise ValueError(f"{INPUT_LABELS[e.field]}: {e.allowed.removesuffix(' here')}; upload one") from None
            name = shown_names.get(e.value, Path(e.value).name)
            raise ValueError(f"{INPUT_LABELS[e.field]}: {printable_name(name)} is not usable: {e.allowed}") from None
    return requests


def check_upload(key: str):
    """The upload event's handler for control ``key``: a file that cannot be used is removed at once
    and the reason shown under the inputs; a good one clears an earlier reason."""
    def handler(value):
        problem = upload_problem(key, value) if value else None
        return (None, f"⚠️ {literal(problem)}") if problem else (gr.update(), "")
    return handler


def listen(state: AppState, c: dict, on_added) -> SimpleNamespace:
    """Wires the form's own events and returns ``add`` (the "Add to queue" handler, taking the
    session id, the queue's shown choices and the form values in ``keys`` order) and ``on_model``
    for the page's load event.
    ``on_added(session, shown)`` returns the queue view updates after jobs are added."""
    keys = form_keys(c)
    model_outputs = ["task", "resolution", "width", "height", "frames", "steps", "guidance",
                     "guidance_high_noise", "boundary", "shift", "sampler", "fps", "guidance_phases", *PHASE_FIELDS,
                     *TASK_INPUT_FIELDS]

    rkeys = remembered_keys(keys)
    switch_outputs = list(dict.fromkeys([*model_outputs, *rkeys]))

    def on_model(model_id, task, memory=None):
        """A model switch: that model's remembered form, else its defaults (the prompt is kept)."""
        u = form_for_model(state, model_id, task, memory)
        return [u.get(k, gr.update()) for k in switch_outputs]
    # .input, not .change: loading earlier settings sets the model too, and must not reset the form
    c["model"].input(on_model, [c["model"], c["task"], c["memory"]], [c[k] for k in switch_outputs])

    def on_task(task, model_id, frames):
        if task_of(model_id, task) != task:  # a stale value from before a model switch: that switch set the form
            return [gr.update() for _ in (*TASK_INPUT_FIELDS, "frames")]
        from wan.registry import get_model
        default = get_model(model_id).defaults.frames
        frames = 1 if task == "t2i" else (default if frames == 1 else frames)  # an image is one frame
        return [*(task_updates(task)[k] for k in TASK_INPUT_FIELDS), gr.update(value=frames)]
    c["task"].input(on_task, [c["task"], c["model"], c["frames"]], [*(c[k] for k in TASK_INPUT_FIELDS), c["frames"]])

    def keep(memory, model_id, *values):
        return remember(memory, model_id, rkeys, values)
    for k in rkeys:  # what the user edits is remembered for this model, in this browser
        c[k].input(keep, [c["memory"], c["model"], *(c[r] for r in rkeys)], c["memory"], trigger_mode="always_last",
                   show_progress="hidden")

    def reset(memory, model_id):
        u = default_form(state, model_id)
        return [forget(memory, model_id), *(u.get(k, gr.update()) for k in switch_outputs)]
    c["reset"].click(reset, [c["memory"], c["model"]], [c["memory"], *(c[k] for k in switch_outputs)])
    c["resolution"].change(lambda r: [gr.update(visible=r == CUSTOM)] * 2, c["resolution"], [c["width"], c["height"]])
    c["guidance_phases"].change(lambda n, m: list(phase_updates(n, m).values()), [c["guidance_phases"], c["model"]],
                                [c[k] for k in PHASE_FIELDS])

    def on_profile(profile_name, model_id):
        u = recipe_updates(profile_name, model_id)
        return [u.get(k, gr.update()) for k in RECIPE_FIELDS]
    c["profile"].input(on_profile, [c["profile"], c["model"]], [c[k] for k in RECIPE_FIELDS])
    for k in DURATION_INPUTS:
        c[k].change(duration_text, [c[n] for n in DURATION_INPUTS], c["duration"])
    for k in ("model", "profile"):
        c[k].change(lambda m, p: plan_text(state, m, p), [c["model"], c["profile"]], c["plan"])
    c["model"].change(lambda m: readiness_updates(state, m), c["model"], [c["readiness"], c["download"]])
    c["random_seed"].click(lambda: -1, None, c["seed"])
    for key in UPLOAD_KINDS:
        c[key].upload(check_upload(key), c[key], [c[key], c["upload_message"]], show_progress="hidden")

    def add(session_id, shown, *args):
        jobs = []
        try:
            for r in collect(state, keys, args):
                jobs.append(state.queue.add(r.to_dict(), session_id))
        except (RequestError, ValueError) as e:
            done = f" ({len(jobs)} queued before it: {', '.join(j.id for j in jobs)})" if jobs else ""
            return [f"⚠️ {literal(str(e))}{done}", *on_added(session_id, shown)]
        names = ", ".join(j.id for j in jobs)
        return [f"Queued {len(jobs)} job{'s' if len(jobs) > 1 else ''}: {names}", *on_added(session_id, shown)]

    def download(session_id, shown, model_id):
        from wan.app.downloads import queue_download
        try:
            job = queue_download(state, model_id, session_id)
        except ValueError as e:
            return [f"⚠️ {literal(str(e))}", *on_added(session_id, shown)]
        return [f"Queued {job.label} as job {job.id}: its progress shows in the queue", *on_added(session_id, shown)]
    return SimpleNamespace(keys=keys, add=add, download=download, on_model=on_model, model_outputs=switch_outputs)


def load_into_form(state: AppState, c: dict, request) -> list:
    """Updates that put an earlier request's settings into the form (model first, then values)."""
    from wan.registry import get_model
    keys = form_keys(c)
    spec = get_model(request.model)
    values = request_to_form(request, spec.sizes)
    model_updates = apply_model(state, spec.id, request.task)
    model_updates.update(phase_updates(request.guidance_phases, spec.id))  # the phases of that run show
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

