"""The generation form as plain data: form values <-> requests, with no gradio in sight.

The UI's keys are the request's field names wherever a field maps one to one (``prompt``,
``frames``, ``guidance`` ...). A few controls are conveniences over request fields and get their
own keys: ``resolution`` ("832x480" or "custom" with ``width``/``height``),
``one_per_line`` (one job per prompt line), the step-saver pickers (``teacache`` ... ``riflex``,
each "profile" to keep what the profile says) that become ``profile_overrides``, ``overrides``
(free ``key=value`` lines, the CLI's ``--set``), and ``loras`` + ``lora_multipliers`` (Wan2GP's
space-separated multiplier string, one entry per selected LoRA, each with the schedule syntax).

Defaults are never retyped here: an empty control means the request field's default
(``request_default``), and the step-saver numbers start at the profile schema's defaults
(``saver_defaults``).

``form_to_requests`` is what the "Add to queue" button calls; ``request_to_form`` loads an earlier
output's settings back into the form. Both are tested without a browser.
"""

from __future__ import annotations

from typing import Any, Mapping

from wan.engine.request import (
    INPUT_FIELDS,
    REQUEST_FIELDS,
    GenerationRequest,
    LoraChoice,
    TASK_INPUTS,
    RequestError,
    request_default,
)

KEEP = "profile"  # picker value: leave the profile's setting alone
CUSTOM = "custom"

# picker key -> (profile setting it overrides, how the picked value is read)
SAVER_PICKERS: dict[str, tuple[str, Any]] = {
    "teacache": ("step_savers.teacache.enabled", lambda v: v == "on"),
    "magcache": ("step_savers.magcache.enabled", lambda v: v == "on"),
    "slg_mode": ("step_savers.slg.mode", str),
    "cfg_skip_mode": ("step_savers.cfg_skip.mode", str),
    "cfg_zero_star": ("step_savers.cfg_zero_star.enabled", lambda v: v == "on"),
    "riflex": ("step_savers.riflex", str),
}
# numbers that go with a picker; they apply only when their picker is not "profile"
SAVER_NUMBERS: dict[str, tuple[str, str]] = {
    "teacache_speedup": ("teacache", "step_savers.teacache.speedup"),
    "magcache_speedup": ("magcache", "step_savers.magcache.speedup"),
    "slg_scale": ("slg_mode", "step_savers.slg.scale"),
    "slg_start": ("slg_mode", "step_savers.slg.start"),
    "slg_end": ("slg_mode", "step_savers.slg.end"),
    "cfg_skip_ratio": ("cfg_skip_mode", "step_savers.cfg_skip.ratio"),
    "cfg_zero_init_steps": ("cfg_zero_star", "step_savers.cfg_zero_star.zero_init_steps"),
}
SLG_LAYERS = ("slg_layers", "slg_mode", "step_savers.slg.layers")
PICKER_CHOICES = {
    "teacache": (KEEP, "off", "on"), "magcache": (KEEP, "off", "on"), "cfg_zero_star": (KEEP, "off", "on"),
    "slg_mode": (KEEP, "none", "original", "uncond"),
    "cfg_skip_mode": (KEEP, "none", "early", "late", "middle", "early_late", "alternate"),
    "riflex": (KEEP, "auto", "on", "off"),
}
# request fields copied as they are (None or "" meaning "the model's default" where allowed)
PLAIN_FIELDS = ("model", "task", "negative_prompt", "frames", "steps", "guidance", "guidance_high_noise", "boundary",
                "guidance_phases", "guidance2_scale", "guidance3_scale", "switch_threshold", "switch_threshold2",
                "model_switch_phase", "shift", "sampler", "strength", "vace_scale", "fps", "quality", "profile")
# sliding windows (wan.engine.windows): copied as they are, like the fields above
WINDOW_FIELDS = ("sliding_window_size", "sliding_window_overlap", "sliding_window_discard_last_frames",
                 "sliding_window_seam", "sliding_window_color_correction", "sliding_window_color_correction_strength",
                 "sliding_window_overlap_noise")
# NAG (wan.optim.nag): a negative prompt that still works at guidance 1
NAG_FIELDS = ("nag_scale", "nag_tau", "nag_alpha")
PLAIN_FIELDS = (*PLAIN_FIELDS, *WINDOW_FIELDS, *NAG_FIELDS)
# request fields the form has no control for: carried as they are in the hidden ``extra`` value, so
# loading an output's settings and queueing them again reproduces it (cpu_noise changes the noise)
EXTRA_FIELDS = ("cpu_noise", "trim_tail", "name_template", "save_latents", "timesteps", "nag2_scale", "nag3_scale")
# whole-number keys: the request's int fields and the one whole-number step-saver setting
INT_FIELDS = (*(name for name, f in REQUEST_FIELDS.items() if f.type is int), "cfg_zero_init_steps")


SUGGESTED_CFG_SKIP_RATIO = 0.6


def saver_defaults() -> dict[str, Any]:
    """Starting values of the step-saver numbers (``SAVER_NUMBERS``) and of ``slg_layers``: what a
    profile that states nothing has, read from the profile schema so they are written once."""
    from functools import reduce

    from wan.optim.profiles import Profile
    schema = Profile()  # every setting at its default

    def read(setting: str) -> Any:
        return reduce(getattr, setting.split("."), schema)
    out = {key: read(setting) for key, (_, setting) in SAVER_NUMBERS.items()}
    # The one number the form suggests itself: the schema's ratio 1.0 applies CFG on every step, so
    # picking a CFG-skip mode would skip nothing; the form offers the fast_preview profile's 0.6.
    out["cfg_skip_ratio"] = SUGGESTED_CFG_SKIP_RATIO
    key, _, setting = SLG_LAYERS
    out[key] = _layers_text(read(setting))
    return out


def _layers_text(layers) -> str:
    """SLG block numbers as the form shows them: ``(8, 9)`` -> ``"8 9"``."""
    return " ".join(map(str, layers or ()))


def parse_resolution(text: str) -> tuple[int, int]:
    """``"832x480"`` -> (832, 480); a RequestError on "resolution" otherwise."""
    w, sep, h = str(text).lower().replace(" ", "").partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise RequestError("resolution", text, 'WIDTHxHEIGHT such as "832x480", or "custom"')
    return int(w), int(h)


def resolution_choices(sizes) -> list[str]:
    return [f"{w}x{h}" for w, h in sizes] + [CUSTOM]


def _number(key: str, value: Any) -> Any:
    """Form numbers arrive as floats (or None / ""): whole-number fields become int."""
    if value is None or value == "":
        return None
    if key in INT_FIELDS:
        if isinstance(value, float) and not value.is_integer():
            raise RequestError(key, value, "a whole number")
        return int(value)
    return value


def _overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    from wan.optim.profiles import ProfileError, parse_override
    out: dict[str, Any] = {}
    for key, (setting, read) in SAVER_PICKERS.items():
        picked = values.get(key) or KEEP
        if picked not in PICKER_CHOICES[key]:
            raise RequestError(key, picked, f"one of: {', '.join(PICKER_CHOICES[key])}")
        if picked != KEEP:
            out[setting] = read(picked)
    for key, (picker, setting) in SAVER_NUMBERS.items():
        if (values.get(picker) or KEEP) != KEEP and values.get(key) not in (None, ""):
            out[setting] = _number(key, values[key])
    key, picker, setting = SLG_LAYERS
    if (values.get(picker) or KEEP) != KEEP and str(values.get(key) or "").strip():
        try:
            out[setting] = [int(t) for t in str(values[key]).replace(",", " ").split()]
        except ValueError:
            raise RequestError(key, values[key], "block numbers separated by spaces or commas, e.g. 9 or 8,9") from None
    for line in str(values.get("overrides") or "").splitlines():
        if line.strip() and not line.strip().startswith("#"):
            try:
                k, v = parse_override(line.strip())
            except ProfileError as e:
                raise RequestError("overrides", line.strip(), str(e)) from None
            out[k] = v
    return out


def _loras(values: Mapping[str, Any]) -> list[LoraChoice]:
    patterns = (values.get("extra") or {}).get("lora_patterns", {})  # path -> [include, exclude]
    names = list(values.get("loras") or [])
    mults = str(values.get("lora_multipliers") or "").split()
    if mults and len(mults) != len(names):
        raise RequestError("lora_multipliers", values.get("lora_multipliers"),
                           f"one entry per selected LoRA ({len(names)} selected), separated by spaces, "
                           "e.g. 1.0 0.8,0.6 1;0")
    return [LoraChoice(name, mults[i] if mults else "1.0", *map(list, patterns.get(name, ([], []))))
            for i, name in enumerate(names)]


def task_inputs(task) -> set[str] | None:
    """The input fields ``task`` takes (None when no task is chosen: the model's default task decides)."""
    return set(TASK_INPUTS[task]) if task in TASK_INPUTS else None


def form_to_requests(values: Mapping[str, Any]) -> list[GenerationRequest]:
    """The form's values -> one request, or one per prompt line with ``one_per_line``.

    Raises:
        RequestError: naming the form field (the request field, or the control's own key).
    """
    if not values.get("model"):
        raise RequestError("model", values.get("model"), "pick a model")
    fields: dict[str, Any] = {k: _number(k, values.get(k)) for k in PLAIN_FIELDS}
    for k in ("model", "task", "sampler", "profile"):
        fields[k] = values.get(k) or None
    if values.get("negative_prompt") in (None, ""):
        fields["negative_prompt"] = None  # the model's default negative prompt
    resolution = values.get("resolution") or CUSTOM
    if resolution == CUSTOM:
        fields["width"], fields["height"] = _number("width", values.get("width")), _number("height", values.get("height"))
    else:
        fields["width"], fields["height"] = parse_resolution(resolution)
    fields["seed"] = _number("seed", values.get("seed"))
    taken = task_inputs(fields["task"])
    for name in INPUT_FIELDS:
        # an input the task does not take (left from another task, hidden on the page) is not sent
        v = values.get(name) if taken is None or name in taken else None
        fields[name] = list(v or []) if name == "ref_images" else (v or None)
    # an empty control means the request's default (for most fields None: the model's default)
    fields = {k: request_default(k) if v is None else v for k, v in fields.items()}
    extra = values.get("extra") or {}
    fields.update({k: extra[k] for k in EXTRA_FIELDS if k in extra})
    fields["profile_overrides"] = _overrides(values)
    fields["loras"] = _loras(values)
    prompt = str(values.get("prompt") or "")
    prompts = [p.strip() for p in prompt.splitlines() if p.strip()] if values.get("one_per_line") else [prompt.strip()]
    if not prompts or not any(prompts):
        raise RequestError("prompt", prompt, "some text describing the video")
    return [GenerationRequest(prompt=p, **fields) for p in prompts]


def request_to_form(req: GenerationRequest, sizes=()) -> dict[str, Any]:
    """A request (usually read from an output's metadata) -> the form's values, the inverse of
    :func:`form_to_requests` for one prompt."""
    values: dict[str, Any] = {k: getattr(req, k) for k in PLAIN_FIELDS}
    values.update(prompt=req.prompt, one_per_line=False, seed=req.seed)
    size = (req.width, req.height)
    values["resolution"] = f"{size[0]}x{size[1]}" if size in tuple(map(tuple, sizes)) else CUSTOM
    values["width"], values["height"] = req.width, req.height
    for name in INPUT_FIELDS:
        values[name] = getattr(req, name)
    overrides = dict(req.profile_overrides)
    for key, (setting, _) in SAVER_PICKERS.items():
        if setting in overrides:
            v = overrides.pop(setting)
            values[key] = ("on" if v else "off") if isinstance(v, bool) else str(v)
        else:
            values[key] = KEEP
    for key, (_, setting) in SAVER_NUMBERS.items():
        values[key] = overrides.pop(setting, None)
    key, _, setting = SLG_LAYERS
    layers = overrides.pop(setting, None)
    values[key] = _layers_text(layers)
    values["overrides"] = "\n".join(f"{k}={_yaml_value(v)}" for k, v in overrides.items())
    values["loras"] = [lo.path for lo in req.loras]
    values["extra"] = {k: getattr(req, k) for k in EXTRA_FIELDS}
    values["extra"]["lora_patterns"] = {lo.path: [lo.include, lo.exclude] for lo in req.loras if lo.include or lo.exclude}
    values["lora_multipliers"] = " ".join(lo.multiplier for lo in req.loras)
    return values


def _yaml_value(v: Any) -> str:
    import yaml
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
