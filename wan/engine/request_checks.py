"""Checks of a request that do not need its model: strict types, finite numbers, clean text, and
the limits of what one request may ask of this machine.

``resolve_request`` runs :func:`check_field_types` first, on what the caller gave, and
:func:`check_limits` last, on the resolved request (every default filled, sizes derived), so a
limit can never be slipped past by leaving a field to its default. Every refusal is a
``RequestError`` naming the field, the value (cut short) and what is allowed.

The limits are the same for the web server and the command line; the server reads them from its
settings, the CLI from flags of the same names (``--max_frames``, ``--max_pixels``, ``--max_steps``)
that a person may raise.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from wan.engine.request import REQUEST_FIELDS, GenerationRequest, LoraChoice, RequestError

MAX_GUIDANCE = 100.0       # far above any useful scale (Wan uses 1..10)
MAX_SHIFT = 100.0
MAX_VACE_SCALE = 10.0
MAX_FPS = 120
MAX_NAG_SCALE = 50.0       # the reference's Wan example uses 9; ComfyUI's NAG node stops at 50
NAG_TAU_RANGE = (1.0, 10.0)  # tau < 1 would shrink even unguided tokens (the authors' ComfyUI node: 1..10)
TEMPLATE_FIELDS = ("time", "seed", "prompt", "model", "task")  # the fields of an output name template


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this machine. The flag (and server setting) of each is its name."""

    max_frames: int = 161
    max_pixels: int = 1280 * 720          # width * height of one output frame
    max_steps: int = 200
    max_prompt_chars: int = 10_000
    max_ref_images: int = 16
    max_loras: int = 8
    max_input_pixels: int = 3840 * 2160   # an input image or video frame
    max_input_frames: int = 10_000        # an input video (only the frames a job needs are decoded)

    @classmethod
    def of(cls, source: Any) -> "Limits":
        """The limits an object sets through attributes of the same names (server settings, parsed
        flags); one it does not set, or sets to None, keeps its default. A limit must be a whole
        number > 0 (the server's settings check that already; flags are checked here)."""
        values = {}
        for f in dataclasses.fields(cls):
            value = getattr(source, f.name, None)
            if value is None:
                continue
            if not _is_int(value) or value < 1:
                raise RequestError(f.name, value, "a whole number > 0")
            values[f.name] = value
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# Types


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def text_problem(text: str) -> str | None:
    """Why a string cannot be stored, written to a file name or shown: a lone surrogate (not
    encodable as UTF-8) or a NUL character; None when it is fine."""
    if "\x00" in text:
        return "it holds a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"it holds an unpaired surrogate at character {e.start} (not valid Unicode text)"
    return None


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise RequestError(name, value, "text (a string)")
    problem = text_problem(value)
    if problem:
        raise RequestError(name, value, f"valid text; {problem}")


_KIND_WORDS = {int: "a whole number", float: "a finite number", bool: "true or false", str: "text (a string)"}


def _check_one(name: str, kind: type, value: Any) -> None:
    if kind is str:
        _check_text(name, value)
    elif kind is bool:
        if not isinstance(value, bool):
            raise RequestError(name, value, "true or false (a boolean, not a string or a number)")
    elif kind is int:
        if not _is_int(value):
            raise RequestError(name, value, "a whole number")
    elif kind is float:
        if not _is_number(value):
            raise RequestError(name, value, "a finite number")


def check_field_types(req: GenerationRequest) -> None:
    """Every field has the type it is declared with: no truthy strings as booleans, whole numbers
    where they are meant, finite floats, valid text, lists of the right items."""
    for f in REQUEST_FIELDS.values():
        value = getattr(req, f.name)
        if value is None and f.optional:
            continue
        if f.name == "loras":
            _check_loras(value)
        elif f.name == "profile_overrides":
            _check_overrides(value)
        elif f.many:
            if not isinstance(value, list):
                raise RequestError(f.name, value, f"a list of {_KIND_WORDS.get(f.type, f.type.__name__)}")
            for item in value:
                _check_one(f.name, f.type, item)
        else:
            _check_one(f.name, f.type, value)


def _check_loras(value: Any) -> None:
    if not isinstance(value, list):
        raise RequestError("loras", value, "a list of LoRAs ({path, multiplier, include, exclude})")
    for lora in value:
        if not isinstance(lora, LoraChoice):
            raise RequestError("loras", lora, "a LoRA ({path, multiplier, include, exclude})")
        _check_text("loras", lora.path)
        _check_text("loras", lora.multiplier)
        for patterns in (lora.include, lora.exclude):
            if not isinstance(patterns, list):
                raise RequestError("loras", patterns, "a list of regular expressions")
            for p in patterns:
                _check_text("loras", p)


def _check_overrides(value: Any) -> None:
    if not isinstance(value, dict):
        raise RequestError("profile_overrides", value, "a mapping of dotted profile keys to values")
    for key, v in value.items():
        _check_text("profile_overrides", key)
        _check_plain(v)


def _check_plain(v: Any, depth: int = 0) -> None:
    """A profile override value: plain data (text, numbers, booleans, null, lists, mappings) a few
    levels deep, the kind of thing a YAML file holds; profile validation checks the rest."""
    if depth > 4:
        raise RequestError("profile_overrides", v, "values nested at most 4 levels deep")
    if isinstance(v, str):
        _check_text("profile_overrides", v)
    elif isinstance(v, float) and not math.isfinite(v):
        raise RequestError("profile_overrides", v, "finite numbers")
    elif isinstance(v, (list, tuple)):
        for x in v:
            _check_plain(x, depth + 1)
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_text("profile_overrides", k)
            _check_plain(x, depth + 1)
    elif not (v is None or isinstance(v, (bool, int, float))):
        raise RequestError("profile_overrides", v, "plain values (text, numbers, true/false, lists, mappings)")


def template_problem(template: Any) -> str | None:
    """What is wrong with an output name template, in words, or None. Literal text is letters,
    digits, '-', '_', '.' and spaces; fields are {time} {seed} {prompt} {model} {task}, written plain:
    a format spec can pad with any character ('{prompt:/>1.0}' renders as '/'), so none is allowed."""
    import string
    if not isinstance(template, str) or not template.strip():
        return "must be a non-empty string"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"is malformed: {e}"
    known = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
    for literal, field_name, spec, conversion in parts:
        bad = sorted({c for c in literal if not (c.isalnum() or c in "-_. ")})
        if bad:
            return f"has the characters {bad}; literal text may hold letters, digits, '-', '_', '.' and spaces"
        if field_name is not None and field_name not in TEMPLATE_FIELDS:
            return f"has the unknown field {{{field_name}}}; known: {known}"
        if spec or conversion:
            return (f"formats the field {{{field_name}}} ('{'!' + conversion if conversion else ''}"
                    f"{':' + spec if spec else ''}'); fields are written plain, e.g. {{{field_name}}}")
    return None


# ---------------------------------------------------------------------------------------------
# Ranges and limits, on the resolved request


def check_ranges(req: GenerationRequest) -> None:
    """Ranges of the numbers that have no model-dependent rule, and the output name template (the
    resolved request)."""
    problem = template_problem(req.name_template)
    if problem:
        raise RequestError("name_template", req.name_template, f"a valid output name template; this one {problem}")
    for name, high in (("guidance", MAX_GUIDANCE), ("guidance_high_noise", MAX_GUIDANCE),
                       ("guidance2_scale", MAX_GUIDANCE), ("guidance3_scale", MAX_GUIDANCE)):
        value = getattr(req, name)
        if value is not None and not 0 <= value <= high:
            raise RequestError(name, value, f"a number from 0 to {high:g}")
    if not 0 < req.shift <= MAX_SHIFT:
        raise RequestError("shift", req.shift, f"a number > 0 and at most {MAX_SHIFT:g}")
    if not 0 <= req.vace_scale <= MAX_VACE_SCALE:
        raise RequestError("vace_scale", req.vace_scale, f"a number from 0 to {MAX_VACE_SCALE:g}")
    if not 1 <= req.fps <= MAX_FPS:
        raise RequestError("fps", req.fps, f"a whole number from 1 to {MAX_FPS}")
    for name in ("nag_scale", "nag2_scale", "nag3_scale"):
        value = getattr(req, name)
        if value is not None and not (value in (0, 1) or 1 < value <= MAX_NAG_SCALE):
            raise RequestError(name, value, f"1 (off; 0 is off too) or a number above 1 up to {MAX_NAG_SCALE:g}; "
                                            "between 0 and 1 it would pull the prompt toward the negative prompt")
    if not NAG_TAU_RANGE[0] <= req.nag_tau <= NAG_TAU_RANGE[1]:
        raise RequestError("nag_tau", req.nag_tau, f"a number from {NAG_TAU_RANGE[0]:g} to {NAG_TAU_RANGE[1]:g}")
    if not 0 <= req.nag_alpha <= 1:
        raise RequestError("nag_alpha", req.nag_alpha, "a number from 0 to 1")


def check_limits(req: GenerationRequest, limits: Limits) -> None:
    """The machine's limits, on the resolved request."""
    if req.frames > limits.max_frames:
        raise RequestError("frames", req.frames, f"at most {limits.max_frames} frames (--max_frames)")
    if req.width * req.height > limits.max_pixels:
        raise RequestError("width", req.width,
                           f"{req.width}x{req.height} is {req.width * req.height} pixels per frame; at most "
                           f"{limits.max_pixels} pixels (width*height, --max_pixels)")
    if req.steps > limits.max_steps:
        raise RequestError("steps", req.steps, f"at most {limits.max_steps} steps (--max_steps)")
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if len(text) > limits.max_prompt_chars:
            raise RequestError(name, text, f"at most {limits.max_prompt_chars} characters (this one has {len(text)})")
    for name, limit, what in (("ref_images", limits.max_ref_images, "reference images"),
                              ("loras", limits.max_loras, "LoRAs")):
        count = len(getattr(req, name))
        if count > limit:
            raise RequestError(name, f"{count} {what}", f"at most {limit} {what}")
