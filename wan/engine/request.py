"""The one request type every caller builds: UI, CLI, batch files and Python.

``GenerationRequest`` holds every generation setting; field names are the CLI flag names and the
UI's keys. Each field is declared once, with :func:`option`: its default, its help text, the other
spellings of its flag (musubi-tuner's and the official scripts') and its type. The ``generate``
flags and the UI form's defaults are read from there (:data:`REQUEST_FIELDS`,
:func:`request_default`), so no default is written twice.

``resolve_request`` validates a request in one place and fills every unset field from the model
registry, giving a request with no ``None`` left and a concrete seed: that resolved request is what
is stored in an output's metadata and what rebuilds the output. Bad input raises
:class:`RequestError`, which names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import random
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan.registry import ModelSpec, Registry, RegistryError, default_registry

TASKS = ("t2v", "t2i", "i2v", "flf2v", "v2v", "fun_inp", "fun_control", "vace", "ti2v")
SAMPLERS = ("unipc", "dpm++", "euler", "lcm")  # wan.engine.samplers.SAMPLERS (this module imports no torch)
MAX_SEED = 2**32 - 1
# Inputs each task reads; anything else given for the task is an error, not silently ignored.
TASK_INPUTS = {
    "t2v": set(), "t2i": set(), "ti2v": {"image"},
    "i2v": {"image", "end_image"}, "flf2v": {"image", "end_image"},
    "v2v": {"video"}, "fun_inp": {"image", "end_image"},
    "fun_control": {"control_video", "image"},
    "vace": {"control_video", "mask_video", "ref_images"},
}
REQUIRED_INPUTS = {"i2v": ("image",), "flf2v": ("image", "end_image"), "v2v": ("video",),
                   "fun_control": ("control_video",), "fun_inp": ("image",)}
INPUT_FIELDS = ("image", "end_image", "video", "control_video", "mask_video", "ref_images", "continue_video")
for _task in ("t2v", "i2v", "flf2v", "fun_inp", "fun_control", "vace", "ti2v"):  # window_plan.CONTINUE_TASKS
    TASK_INPUTS[_task].add("continue_video")


SHOWN_CHARS = 200  # a refused value is echoed at most this long


def short_repr(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: a 1 MB prompt is not echoed back whole."""
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not hide the refusal
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text)} characters)"


class RequestError(ValueError):
    """A request field has a value that is not allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field_name, value, allowed
        super().__init__(f"{field_name}: {short_repr(value)} is not allowed; {allowed}")


@dataclass
class LoraChoice:
    """One LoRA of a request: a file (or a name in the LoRA folder), its multiplier string, and
    regular expressions on module names limiting where it applies (musubi-tuner's
    ``--include_patterns`` / ``--exclude_patterns``; empty: everywhere)."""

    path: str
    multiplier: str = "1.0"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)


def option(default: Any = dataclasses.MISSING, help: str = "", *, aliases: tuple[str, ...] = (),  # noqa: A002
           metavar: str | None = None, flag: bool = True) -> Any:
    """A request field, declared once with everything its callers show of it.

    Args:
        default: the value when the caller gives none (none for ``model``, which every request
            names). An empty list or dict becomes a fresh one per request.
        help: what the field means; the CLI's help text.
        aliases: other spellings of its ``generate`` flag (musubi-tuner's, the official scripts').
        metavar: the value's name in ``--help``.
        flag: False for a field ``generate`` builds from flags of its own (``--lora``, ``--set``).
    """
    metadata = {"help": help, "aliases": tuple(aliases), "metavar": metavar, "flag": flag}
    if isinstance(default, (list, dict)):
        if default:
            raise ValueError("a request field's list or dict default must be empty (it is made fresh each time)")
        return field(default_factory=type(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _lora_of(value: Any) -> "LoraChoice":
    """A LoRA of a request mapping: a LoraChoice or a mapping of its fields."""
    if isinstance(value, LoraChoice):
        return value
    names = [f.name for f in dataclasses.fields(LoraChoice)]
    if not isinstance(value, dict) or "path" not in value or any(k not in names for k in value):
        raise RequestError("loras", value, f"a LoRA: a mapping with 'path' and optionally {', '.join(names[1:])}")
    return LoraChoice(**value)


@dataclass
class GenerationRequest:
    """Every setting of one generation. ``None`` means "the model's default"."""

    model: str = option(help="model id (see: python wgp.py models)")
    prompt: str = option("", "what the video shows", aliases=("-p",))
    task: str | None = option(None, f"one of {', '.join(TASKS)} (default: the model's first); generate also "
                                    "takes a musubi-tuner task name (t2v-14B, i2v-A14B, ...), which names the model")
    negative_prompt: str | None = option(None, "what to steer away from (default: the model's negative prompt)")
    width: int | None = option(None, "width in pixels (default: the model's)")
    height: int | None = option(None, "height in pixels (default: the model's)")
    frames: int | None = option(None, "number of frames, 4k+1 (default: the model's)", aliases=("--video_length",))
    steps: int | None = option(None, "denoising steps (default: the model's)", aliases=("--infer_steps",))
    guidance: float | None = option(None, "classifier-free guidance scale (default: the model's)",
                                    aliases=("--guidance_scale",))
    guidance_high_noise: float | None = option(
        None, "Wan 2.2 A14B: guidance while the high-noise expert runs (default: the model's, else --guidance)",
        aliases=("--guidance_scale_high_noise",))
    boundary: float | None = option(
        None, "Wan 2.2 A14B: expert switch, a fraction of 1000 (musubi's value above 1 is read as a timestep)",
        aliases=("--timestep_boundary",))
    guidance_phases: int | None = option(
        None, "guidance phases, 1 to 3 (Wan2GP's): from 1000 down, a phase ends at the first step whose timestep "
              "is below its threshold; each has its own guidance and, on Wan 2.2 A14B, its expert "
              "(default: 2 on A14B, where the expert switch ends a phase, else 1)")
    guidance2_scale: float | None = option(
        None, "guidance of phase 2 (default: the guidance of the expert that runs it: --guidance, or "
              "--guidance_high_noise)")
    guidance3_scale: float | None = option(
        None, "guidance of phase 3 (default: the guidance of the expert that runs it)")
    switch_threshold: float | None = option(
        None, "timestep 0-1000 where phase 2 starts (A14B: the expert switch when --model_switch_phase is 1, "
              "the default: then it is --boundary x 1000, give either)")
    switch_threshold2: float | None = option(
        None, "timestep 0-1000 where phase 3 starts, at most --switch_threshold (A14B with --model_switch_phase 2: "
              "the expert switch, --boundary x 1000)")
    model_switch_phase: int | None = option(
        None, "Wan 2.2 A14B: the phase after which the low-noise expert runs, 1 or 2 (2 with 3 phases: a guided and "
              "an accelerated phase on the high-noise expert, Wan2GP's Lightning 3 phases; default 1)")
    nag_scale: float = option(
        1.0, "NAG (normalized attention guidance): how strongly the negative prompt steers inside the prompt's own "
             "cross-attention, so that it works at guidance 1 (few-step and distilled models) and beside guidance "
             "above 1; 1 is off, more is stronger (the reference's Wan example: 9); Wan2GP's NAG_scale")
    nag2_scale: float | None = option(
        None, "NAG scale in guidance phase 2 (default: --nag_scale; 1 turns NAG off there), e.g. NAG only in the "
              "accelerated phases of a 3-phase recipe")
    nag3_scale: float | None = option(None, "NAG scale in guidance phase 3 (default: --nag_scale; 1 is off)")
    nag_tau: float = option(2.5, "NAG: the most a token's guided attention may grow over the prompt's alone (ratio "
                                 "of L1 norms), 1 to 10 (Wan2GP's NAG_tau; its default is 3.5)")
    nag_alpha: float = option(0.25, "NAG: the share of the guided attention blended into the prompt's, 0 to 1 "
                                    "(Wan2GP's NAG_alpha; its default is 0.5)")
    shift: float | None = option(None, "timestep shift of the flow schedule (default: the model's for the size)",
                                 aliases=("--flow_shift",))
    sampler: str | None = option(None, f"one of {', '.join(SAMPLERS)} (default: the model's)",
                                 aliases=("--sample_solver",))
    timesteps: list[float] = option(
        [], "the denoising timesteps themselves, 1000 down to above 0, one per step (FastVideo's "
            "dmd_denoising_steps, e.g. 1000 757 522): the model gets them as given, at noise t/1000, and --shift "
            "is not used; euler and lcm only (default: the sampler's grid from --steps and --shift)", metavar="T")
    seed: int = option(-1, "noise seed; -1 picks a random one and records it")
    # task inputs
    image: str | None = option(None, "start image (i2v, flf2v, fun_inp, ti2v; the reference of fun_control)",
                               aliases=("--image_path",))
    end_image: str | None = option(None, "end image (flf2v, fun_inp; optional for i2v)",
                                   aliases=("--end_image_path",))
    video: str | None = option(None, "input video (v2v)", aliases=("--video_path",))
    strength: float = option(0.75, "v2v: how much of the input video is re-noised, in (0, 1]",
                             aliases=("--denoise_strength",))
    control_video: str | None = option(None, "control video (fun_control, vace)", aliases=("--control_path",))
    mask_video: str | None = option(None, "vace: mask video of the control video", aliases=("--mask_path",))
    ref_images: list[str] = option([], "vace: reference images", metavar="IMAGE")
    vace_scale: float = option(1.0, "vace: strength of the control")
    # sliding windows and continuation (wan.engine.windows), with Wan2GP's flag names
    sliding_window_size: int = option(
        0, "frames per window, 4k+1: a longer clip (--frames) is made window by window, each one starting from "
           "the last frames of the one before, into one file; 0: the whole clip in one run")
    sliding_window_overlap: int = option(
        5, "frames each window shares with the one before (conditioned on them; 4k+1 frames keep whole latents)")
    sliding_window_discard_last_frames: int = option(
        0, "frames dropped from the end of each window before the next one starts from it")
    sliding_window_seam: str = option(
        "cut", "how windows join: cut (the overlap keeps the earlier frames) or crossfade (blends them into the "
               "new ones)")
    sliding_window_color_correction: str = option(
        "mean_std", "colour correction of each window towards the first (Lab): off, mean_std or histogram")
    sliding_window_color_correction_strength: float = option(
        0.0, "how much of the colour correction applies, 0 (off) to 1")
    sliding_window_overlap_noise: int = option(
        0, "VACE windows: noise blended into the overlap frames' control latents at every step, in thousandths, "
           "0 to 150 (Wan2GP's VACE default, 20, blends in 2 parts in 100), against blur at the seams; 0: off")
    continue_video: str | None = option(
        None, "a video to continue (an earlier output or an upload): its last frames start the --frames new "
              "ones, and the output is that video followed by them")
    loras: list[LoraChoice] = option([], "LoRAs of this job (generate: --lora, --lora_weight ...)", flag=False)
    profile: str | None = option(None, "profile name or number (see: python wgp.py profiles), e.g. 4 or fast_preview")
    profile_overrides: dict[str, Any] = option(
        {}, "profile settings changed for this job, by dotted key, e.g. step_savers.teacache.enabled: True "
            "(generate: --set KEY=VALUE)", flag=False)
    # output
    output_dir: str = option("outputs", "folder the outputs are written to", aliases=("--save_path",))
    name_template: str = option("{time}_seed{seed}_{prompt}", "output file name without extension; fields: "
                                                                "{time} {seed} {prompt} {model} {task}")
    fps: int | None = option(None, "frames per second of the video (default: the model's)")
    quality: int = option(8, "video quality, 0 (smallest file) to 10 (best)")
    save_latents: bool = option(False, "also write the final latents (.safetensors)")
    trim_tail: int = option(0, "frames dropped from the end of the clip before writing")
    cpu_noise: bool = option(False, "draw the noise on the CPU (same result on every device)")

    # -- serialisation --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationRequest":
        """The request of a mapping (JSON, metadata). Values are taken as they are, for
        ``resolve_request`` to check; only the shape is checked here, so whatever a client sends
        ends in a :class:`RequestError` naming a field, never another exception."""
        if not isinstance(data, dict):
            raise RequestError("request", data, "a mapping of request fields to values")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((k for k in data if k not in known), key=str)
        if unknown:
            raise RequestError(str(unknown[0]), data[unknown[0]],
                               f"not a request field; fields are: {', '.join(sorted(known))}")
        if "model" not in data:
            raise RequestError("model", None, "a model id (see: python wgp.py models)")
        data = dict(data)
        loras = data.get("loras", [])
        if isinstance(loras, list):
            data["loras"] = [_lora_of(lo) for lo in loras]
        if isinstance(data.get("ref_images"), tuple):
            data["ref_images"] = list(data["ref_images"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "GenerationRequest":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# The fields as the CLI and the UI read them


@dataclass(frozen=True)
class RequestField:
    """One request field's declaration, read for building flags and form controls.

    ``type`` is the type of one value: ``int`` for ``int | None``, ``str`` for ``list[str]`` (then
    ``many`` is true), ``dict`` for ``profile_overrides``.
    """

    name: str
    type: type
    many: bool
    help: str
    aliases: tuple[str, ...]
    metavar: str | None
    flag: bool
    optional: bool = False  # None is allowed (it means the model's default)

    @property
    def default(self) -> Any:
        return request_default(self.name)


def request_default(name: str) -> Any:
    """The value of field ``name`` when the caller gives none (a fresh list or dict for those
    fields); None for ``model``, which has no default: every request names its model."""
    f = _DATACLASS_FIELDS[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _value_type(hint: Any) -> tuple[type, bool]:
    """A field's annotation -> (type of one value, whether it is a list)."""
    origin, args = typing.get_origin(hint), [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is list:
        return args[0], True
    if origin in (types.UnionType, typing.Union):  # "X | None": None means the model's default
        return args[0], False
    return origin or hint, False


def _describe(f: dataclasses.Field, hint: Any) -> RequestField:
    kind, many = _value_type(hint)
    m = f.metadata
    optional = type(None) in typing.get_args(hint)
    return RequestField(f.name, kind, many, m["help"], m["aliases"], m["metavar"], m["flag"], optional)


_DATACLASS_FIELDS = {f.name: f for f in dataclasses.fields(GenerationRequest)}
_HINTS = typing.get_type_hints(GenerationRequest)
# Every field of GenerationRequest by name, in declaration order.
REQUEST_FIELDS: dict[str, RequestField] = {name: _describe(f, _HINTS[name]) for name, f in _DATACLASS_FIELDS.items()}


# ---------------------------------------------------------------------------------------------
# Resolution: defaults from the registry, validation


def resolve_request(req: GenerationRequest, registry: Registry | None = None,
                    check_files: bool = True, limits=None) -> tuple[GenerationRequest, ModelSpec]:
    """Validates ``req`` and fills every default. Returns (resolved request, model spec).

    Types are checked first, on what was given; ranges and ``limits`` (a
    :class:`~wan.engine.request_checks.Limits`, default ones when None) last, on the resolved
    request, so a default or a derived size cannot slip past them.

    Raises:
        RequestError: naming the first field whose value is not allowed.
    """
    from wan.engine.request_checks import Limits, check_field_types, check_limits, check_ranges
    check_field_types(req)
    registry = registry or default_registry()
    try:
        spec = registry.get(req.model)
    except RegistryError:
        raise RequestError("model", req.model, f"known models: {', '.join(registry.ids())}") from None
    task = req.task or spec.tasks[0]
    if task not in spec.tasks:
        raise RequestError("task", task, f"model {spec.id} supports: {', '.join(spec.tasks)}")
    from wan.engine.accelerators import apply_profile_sampling
    from wan.engine.phases import check_phase_steps, resolve_phases, resolve_timesteps
    req = apply_profile_sampling(req, spec, registry)  # a profile's recipe fills what the request leaves unset
    d = spec.defaults
    width, height = _size(req, spec, task)
    frames = _frames(req, spec, task)
    steps = _positive_int("steps", req.steps if req.steps is not None else d.steps)
    sampler = req.sampler or d.sampler
    if sampler not in SAMPLERS:
        raise RequestError("sampler", sampler, f"choose one of: {', '.join(SAMPLERS)}")
    given_steps, timesteps = resolve_timesteps(req, sampler)
    steps = given_steps or steps
    shift = req.shift if req.shift is not None else d.shift_for((width, height))
    _positive_float("shift", shift)
    guidance = _non_negative_float("guidance", req.guidance if req.guidance is not None else d.guidance)
    guidance_high = boundary = None
    if spec.is_two_expert:
        guidance_high = _non_negative_float(
            "guidance_high_noise", req.guidance_high_noise if req.guidance_high_noise is not None
            else d.guidance_high_noise if d.guidance_high_noise is not None else guidance)
        boundary = req.boundary if req.boundary is not None else d.boundary
        if boundary is None or not 0.0 <= boundary <= 1.0:
            raise RequestError("boundary", boundary, "a fraction between 0 and 1 (expert switch at boundary*1000)")
    else:
        for name in ("guidance_high_noise", "boundary"):
            if getattr(req, name) is not None:
                raise RequestError(name, getattr(req, name), f"only for two-expert models (Wan 2.2 A14B); {spec.id} has one")
    phases = resolve_phases(req, spec, boundary)  # guidance_phases, model_switch_phase; A14B: boundary
    boundary = phases.pop("boundary", boundary)
    seed = req.seed
    if seed == -1:
        seed = random.randint(0, MAX_SEED)
    elif not 0 <= seed <= MAX_SEED:
        raise RequestError("seed", seed, f"-1 (random) or 0..{MAX_SEED}")
    _check_inputs(req, task, check_files, limits or Limits(), frames)
    _check_profile_and_loras(req)
    if not 0.0 < req.strength <= 1.0:
        raise RequestError("strength", req.strength, "a number in (0, 1]")
    fps = _positive_int("fps", req.fps if req.fps is not None else d.fps)
    if not 0 <= req.quality <= 10:
        raise RequestError("quality", req.quality, "0 (smallest file) to 10 (best)")
    if not 0 <= req.trim_tail < frames:
        raise RequestError("trim_tail", req.trim_tail, f"0..{frames - 1} (the clip has {frames} frames)")
    negative = req.negative_prompt if req.negative_prompt is not None else d.negative_prompt.get(task, "")
    resolved = req.replace(task=task, width=width, height=height, frames=frames, steps=steps, sampler=sampler,
                           shift=float(shift), guidance=float(guidance), guidance_high_noise=guidance_high,
                           boundary=boundary, seed=seed, negative_prompt=negative, fps=fps, model=spec.id,
                           timesteps=timesteps, **phases,
                           nag_scale=float(req.nag_scale), nag_tau=float(req.nag_tau), nag_alpha=float(req.nag_alpha),
                           **{k: None if getattr(req, k) is None else float(getattr(req, k))
                              for k in ("nag2_scale", "nag3_scale")})
    check_ranges(resolved)
    check_limits(resolved, limits or Limits())
    resolved = _check_windows(resolved, spec)
    check_phase_steps(resolved, spec)
    return resolved, spec


def _check_windows(req: GenerationRequest, spec: ModelSpec) -> GenerationRequest:
    """The sliding-window and continuation settings (:mod:`wan.engine.window_plan`)."""
    from wan.engine.window_plan import check_window_request
    req = req.replace(sliding_window_color_correction_strength=float(req.sliding_window_color_correction_strength))
    check_window_request(req, spec.vae.stride[0])
    return req


def _size(req: GenerationRequest, spec: ModelSpec, task: str) -> tuple[int, int]:
    # a side left unset keeps the model's default (an inline --w alone changes only the width)
    width = req.width if req.width is not None else spec.default_size[0]
    height = req.height if req.height is not None else spec.default_size[1]
    stride = spec.vae.stride[1] * spec.arch.patch_size[1]
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0:
            raise RequestError(name, v, "a positive whole number of pixels")
        if v % stride:
            lo, hi = max(stride, v // stride * stride), (v // stride + 1) * stride
            raise RequestError(name, v, f"a multiple of {stride} for {spec.id} (VAE stride x patch); "
                                        f"nearest: {lo} or {hi}")
    return width, height


def _frames(req: GenerationRequest, spec: ModelSpec, task: str) -> int:
    if task == "t2i":
        if req.frames not in (None, 1):
            raise RequestError("frames", req.frames, "1 for text-to-image")
        return 1
    frames = req.frames if req.frames is not None else spec.defaults.frames
    t = spec.vae.stride[0]
    if not isinstance(frames, int) or frames < 1 or (frames - 1) % t:
        near = max(1, (frames - 1) // t * t + 1) if isinstance(frames, int) else spec.defaults.frames
        raise RequestError("frames", frames, f"{t}k+1 frames (1, 5, 9, ... 81 ...); nearest below: {near}")
    return frames


VIDEO_FIELDS = ("video", "control_video", "mask_video", "continue_video")


def _check_inputs(req: GenerationRequest, task: str, check_files: bool, limits, frames: int) -> None:
    allowed = TASK_INPUTS[task]
    for name in INPUT_FIELDS:
        value = getattr(req, name)
        if value and name not in allowed:
            raise RequestError(name, value, f"task {task} takes: {', '.join(sorted(allowed)) or 'no input files'}")
    for name in REQUIRED_INPUTS.get(task, ()):
        if not getattr(req, name) and not (name == "image" and req.continue_video):  # continued: its frames start
            raise RequestError(name, getattr(req, name), f"task {task} needs an input file here")
    if task == "vace" and not (req.control_video or req.ref_images):
        raise RequestError("control_video", None, "task vace needs a control video or reference images")
    if not check_files:
        return
    for name in INPUT_FIELDS:
        values = getattr(req, name)
        for value in ([values] if isinstance(values, str) else values or []):
            if not Path(value).is_file():
                raise RequestError(name, value, "an existing, readable file")
            _check_input_file(name, value, limits, frames)


def _check_input_file(name: str, path: str, limits, frames: int) -> None:
    """An input's size and length from its header, before anything is decoded: within the limits,
    and a video long enough for the clip."""
    from wan.engine.media_probe import probe_image, probe_video
    try:
        if name in VIDEO_FIELDS:
            width, height, count, _fps = probe_video(path)
        else:
            (width, height), count = probe_image(path), None
    except ValueError as e:
        kind = "video" if name in VIDEO_FIELDS else "image"
        raise RequestError(name, path, f"a readable {kind} file ({e})") from None
    if width * height > limits.max_input_pixels:
        raise RequestError(name, path, f"an input of at most {limits.max_input_pixels} pixels per frame; "
                                       f"this one is {width}x{height}")
    if count is not None and count > limits.max_input_frames:
        raise RequestError(name, path, f"a video of at most {limits.max_input_frames} frames; this one has {count}")
    if count is not None and count < frames and name != "continue_video":  # any length is continued
        raise RequestError(name, path, f"a video of at least {frames} frames (the clip's length); it has {count}")


def _check_profile_and_loras(req: GenerationRequest) -> None:
    """Profiles and LoRA multipliers are checked here, before any model loads."""
    from wan.lora.schedule import parse_multiplier
    for lora in req.loras:  # files are found and checked against the model when the job runs
        try:
            parse_multiplier(lora.multiplier)
        except ValueError as e:
            raise RequestError("loras", f"{lora.path}:{lora.multiplier}", str(e)) from None
    if req.profile is not None or req.profile_overrides:
        from wan.optim.apply import resolve_profile
        from wan.optim.profiles import ProfileError
        try:
            resolve_profile(req.profile, req.profile_overrides)
        except ProfileError as e:
            field_name = "profile_overrides" if req.profile_overrides and req.profile is None else "profile"
            raise RequestError(field_name, req.profile if field_name == "profile" else req.profile_overrides,
                               str(e)) from None


def _positive_int(name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise RequestError(name, v, "a whole number > 0")
    return v


def _positive_float(name: str, v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise RequestError(name, v, "a number > 0")
    return float(v)


def _non_negative_float(name: str, v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
        raise RequestError(name, v, "a number >= 0")
    return float(v)
