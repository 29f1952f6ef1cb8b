"""A training job's request, checked field by field: what the Train tab (or a script) puts in the queue.

A training job is a job of the ordinary queue (one worker: it never runs beside a generation), whose
request is::

    {"train": {<TrainConfig settings, flat, with musubi-tuner's flag names>},
     "expert": None | "high_noise" | "low_noise",   # Wan 2.2 A14B, two LoRAs: this expert's only
     "trigger_words": "sks, my style",              # written into the LoRA and its preset
     "sample_prompts": "<prompt lines with inline options, as musubi's --sample_prompts file>"}

Every value comes from a browser or a script, so nothing in it is trusted: the settings go through
:class:`~wan.train.config.TrainConfig` (an error names the setting), the paths it may hold
(``dataset_config``, ``resume``) must lie in the folders training may use
(:func:`wan.app.security.train_roots`), and the flags that name model files, devices or other folders
are the server's alone (:data:`SERVER_FLAGS`). Limits: ``max_train_steps`` (a server setting), the
rank, and the server's frame and pixel limits for the dataset and the sample prompts.

The checks of the dataset itself (its folders, its items, its sizes) are in :mod:`wan.app.train_dataset`;
the job's runner and resumption in :mod:`wan.app.train_jobs`.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

TRAIN_KEY = "train"
REQUEST_KEYS = (TRAIN_KEY, "expert", "trigger_words", "sample_prompts")
EXPERTS = ("high_noise", "low_noise")
RUNS_FOLDER = "train"  # runs live in <output folder>/train/<output_name>
MAX_RANK = 1024
MAX_TRIGGER_CHARS = 300
MAX_PROMPT_LINES = 16
MAX_PROMPT_LINE_CHARS = 2000
SHOWN_CHARS = 120

# Settings only the server gives (a request naming one is refused, with the reason).
_MODEL_FILES = "the model's files on this machine are used: pick the model"
SERVER_FLAGS: dict[str, str] = {
    "checkpoint_dir": "the server's checkpoints folder is used",
    "dit": _MODEL_FILES, "dit_high_noise": _MODEL_FILES, "vae": _MODEL_FILES, "t5": _MODEL_FILES,
    "clip": _MODEL_FILES, "task": "pick the model (a registry id) instead",
    "device": "the server picks its device",
    "sample_prompts": "give the prompt lines themselves (the request's sample_prompts text)",
    "logging_dir": "TensorBoard logs are not written by the server; the run's JSONL log is always written",
    "log_with": "TensorBoard logs are not written by the server; the run's JSONL log is always written",
    "log_prefix": "TensorBoard logs are not written by the server; the run's JSONL log is always written",
    "network_weights": "starting from another LoRA file is not offered by the server",
    "show_timesteps": "showing the timestep distribution is a command-line tool: wgp.py train --show_timesteps",
}


class TrainRequestError(ValueError):
    """A field of a training request (or of the Train tab) that is not allowed; ``field`` names it
    (``train.network_dim``, ``dataset``, ``frames``...), the message says what is allowed."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")

    @classmethod
    def bad(cls, field: str, value: Any, allowed: str) -> TrainRequestError:
        return cls(field, f"{short(value)} is not allowed; {allowed}")


def short(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut short, printable: a value is echoed, never a megabyte of it."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not hide the refusal
        text = f"<{type(value).__name__}>"
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def is_training(request) -> bool:
    """Whether a queue job's request is a training run (not a generation or a download)."""
    return isinstance(request, dict) and TRAIN_KEY in request and set(request) <= set(REQUEST_KEYS)


def run_folder(settings, output_name: str) -> Path:
    """Where a run writes its LoRA files, states, log and samples: ``<output folder>/train/<name>``."""
    return Path(os.path.realpath(Path(settings.output_dir).expanduser())) / RUNS_FOLDER / output_name


# ---------------------------------------------------------------------------------------------
# The settings


_FLAG = re.compile(r"^--([A-Za-z0-9_]+):")


def config_error_field(error: Exception, prefix: str = "train.") -> tuple[str, str]:
    """(field, message) of a TrainConfigError (``--network_dim: 0 is not allowed; ...``): the flag it
    names as the field (``train.network_dim``) and the rest as the message."""
    text = str(error)
    match = _FLAG.match(text)
    if match:
        return prefix + match.group(1), text[match.end():].strip()
    return prefix.rstrip("."), text


def checked_config(flat: dict, where: str = "train"):
    """The TrainConfig of a request's flat settings (every value checked; the rules between settings
    that hold for any use too). Raises :class:`TrainRequestError` naming ``<where>.<flag>``."""
    from wan.train.config import TrainConfigError, check_settings, config_from_sources
    if not isinstance(flat, dict):
        raise TrainRequestError.bad(where, flat, "an object of training settings (musubi-tuner's flag names)")
    for key in flat:
        if not isinstance(key, str):
            raise TrainRequestError.bad(where, key, "setting names are strings")
        if key in SERVER_FLAGS:
            raise TrainRequestError(f"{where}.{key}", f"is set by the server: {SERVER_FLAGS[key]}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()}
    try:
        cfg = config_from_sources(flag_data=values)
        check_settings(cfg)
    except TrainConfigError as e:
        from wan.train.config import FLAG_NAMES
        field, message = config_error_field(e, where + ".")
        if field.removeprefix(where + ".") not in FLAG_NAMES:  # an unknown setting: the message names it
            field, message = where, str(e)
        raise TrainRequestError(field, message) from None
    except (TypeError, ValueError, RecursionError) as e:  # a value pydantic itself cannot take
        raise TrainRequestError(where, f"a setting's value cannot be read ({type(e).__name__})") from None
    return cfg


MAX_ACCUMULATION = 1024
MAX_BUCKETS = 1000
OPTIMIZERS = ("AdamW, AdamW8bit, Adafactor, Prodigy, AdamWScheduleFree, a torch.optim class name (SGD), or "
              "bitsandbytes.optim.<Class>; other dotted names import any module, and are for the command line")
_OPTIMIZER = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*|bitsandbytes\.optim\.[A-Za-z_][A-Za-z0-9_]*)$")


def check_limits(cfg, settings, where: str = "train") -> None:
    """The server's limits on the settings alone (the dataset's are checked with the dataset), and what a
    browser may not ask although the command line may (an optimizer class from any module)."""
    if cfg.max_train_epochs is None and cfg.max_train_steps > settings.max_train_steps:
        raise TrainRequestError.bad(f"{where}.max_train_steps", cfg.max_train_steps,
                                    f"at most {settings.max_train_steps} on this server (--max_train_steps)")
    if (cfg.network_dim or 4) > MAX_RANK:
        raise TrainRequestError.bad(f"{where}.network_dim", cfg.network_dim, f"a rank from 1 to {MAX_RANK}")
    if not _OPTIMIZER.match(cfg.optimizer_type):
        raise TrainRequestError.bad(f"{where}.optimizer_type", cfg.optimizer_type, OPTIMIZERS)
    if cfg.gradient_accumulation_steps > MAX_ACCUMULATION:
        raise TrainRequestError.bad(f"{where}.gradient_accumulation_steps", cfg.gradient_accumulation_steps,
                                    f"an integer from 1 to {MAX_ACCUMULATION}")
    if (cfg.timestep.num_timestep_buckets or 1) > MAX_BUCKETS:
        raise TrainRequestError.bad(f"{where}.num_timestep_buckets", cfg.timestep.num_timestep_buckets,
                                    f"an integer from 1 to {MAX_BUCKETS}")
    if cfg.seed is not None and cfg.seed >= 2 ** 63:
        raise TrainRequestError.bad(f"{where}.seed", cfg.seed, "an integer from 0 to 2**63 - 1")
    if cfg.model is None:
        raise TrainRequestError(f"{where}.model", "required: the registry id of a model ready on this machine")
    if cfg.dataset_config is None:
        raise TrainRequestError(f"{where}.dataset_config", "required: the dataset TOML (the Train tab writes one)")
    if cfg.output_name is None:
        raise TrainRequestError(f"{where}.output_name", "required: the LoRA's name")
    from wan.app.security import check_name
    try:
        check_name(cfg.output_name, "LoRA name")
    except ValueError as e:
        raise TrainRequestError(f"{where}.output_name", str(e)) from None


def check_model(model_id, state, where: str = "train.model"):
    """The registry spec of a model that can be trained here: known, ready on this machine (no download
    during a training job), of a kind the Train tab trains (t2v, i2v, flf2v, TI2V, Fun InP, Wan 2.2 A14B)."""
    from wan.registry import RegistryError, get_model
    try:
        spec = get_model(model_id)
    except (RegistryError, TypeError):
        raise TrainRequestError.bad(where, model_id, "a registry model id (see: wgp.py models)") from None
    problem = untrainable(spec)
    if problem:
        raise TrainRequestError.bad(where, model_id, problem)
    ready = state.readiness(spec, estimate=True)
    if not ready.ready:
        raise TrainRequestError(where, ready.refusal(spec.id, ways="the Download button on the Generate tab"))
    return spec


def untrainable(spec) -> str | None:
    """Why the Train tab does not train ``spec`` (None when it does)."""
    tasks = set(spec.tasks)
    if spec.arch.model_type == "vace" or "vace" in tasks:
        return "a model the Train tab trains: VACE models are not trained here"
    if "fun_control" in tasks:
        return ("a model the Train tab trains: Fun Control needs control videos in the dataset "
                "(use wgp.py cache_latents / train with a dataset TOML that names them)")
    return None


def check_expert(expert, spec, where: str = "expert") -> str | None:
    if expert is None:
        return None
    if expert not in EXPERTS:
        raise TrainRequestError.bad(where, expert, f"null (both experts share one LoRA), or one of {', '.join(EXPERTS)}")
    if not spec.is_two_expert:
        raise TrainRequestError.bad(where, expert, f"null: model {spec.id} has one DiT, not two experts")
    return expert


def check_trigger_words(text, where: str = "trigger_words") -> str:
    if text is None:
        return ""
    if not isinstance(text, str) or len(text) > MAX_TRIGGER_CHARS or not text.isprintable():
        raise TrainRequestError.bad(where, text, f"printable text of at most {MAX_TRIGGER_CHARS} characters, "
                                                 "words separated by commas")
    return ", ".join(w.strip() for w in text.split(",") if w.strip())


def check_sample_prompts(text, spec, settings, where: str = "sample_prompts") -> list[str]:
    """The prompt lines (blank lines and # comments left out), each one a request the server would
    accept: its inline options within the server's limits, input files (``--i``) only from the folders
    training may use. Raises :class:`TrainRequestError` naming the line."""
    from wan.app.security import is_inside, limits_of, train_roots
    from wan.engine.prompt_lines import parse_prompt_line
    from wan.engine.request import INPUT_FIELDS, GenerationRequest, RequestError, resolve_request
    if text is None or text == "":
        return []
    if not isinstance(text, str):
        raise TrainRequestError.bad(where, text, "text: one prompt per line (inline options such as --w 64 --f 9)")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if len(lines) > MAX_PROMPT_LINES:
        raise TrainRequestError(where, f"{len(lines)} prompt lines; at most {MAX_PROMPT_LINES}")
    roots = train_roots(settings)
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_PROMPT_LINE_CHARS or not line.isprintable():
            raise TrainRequestError(f"{where} line {number}", f"printable text of at most {MAX_PROMPT_LINE_CHARS} "
                                                              "characters")
        try:
            request = parse_prompt_line(line, GenerationRequest(model=spec.id, seed=0))
            resolve_request(request, limits=limits_of(settings))
        except RequestError as e:
            raise TrainRequestError(f"{where} line {number}", str(e)) from None
        for name in INPUT_FIELDS:
            value = getattr(request, name)
            for path in [value] if isinstance(value, str) else value or []:
                if not isinstance(path, str) or not any(is_inside(path, root) for root in roots):
                    raise TrainRequestError(f"{where} line {number}",
                                            f"{name} {short(path)}: an input file inside "
                                            f"{' or '.join(map(str, roots))}")
    return lines


# ---------------------------------------------------------------------------------------------
# The Train tab's "advanced" text: any other training flag


def parse_advanced(text, where: str = "advanced") -> dict[str, Any]:
    """``--flag value`` text (musubi-tuner's flag names; hyphens read as underscores; a switch takes no
    value; a list flag takes the words up to the next flag) -> flat settings. Unknown and unsupported
    flags are refused by name with the reason; the values are checked by TrainConfig later."""
    from wan.train.config import UNSUPPORTED_FLAGS, flags
    from wan.config import did_you_mean
    if text is None or not str(text).strip():
        return {}
    if not isinstance(text, str):
        raise TrainRequestError.bad(where, text, "text of --flag value pairs")
    try:
        words = shlex.split(text, comments=True)
    except ValueError as e:
        raise TrainRequestError(where, f"cannot be read as flags ({e}); write --flag value, quoting values with spaces") \
            from None
    kinds = {f.name: f.kind for f in flags()}
    out: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) < 3:
            raise TrainRequestError(where, f"{short(word)} is not allowed here; expected a flag such as "
                                           "--lr_scheduler cosine")
        name = word[2:].replace("-", "_")
        if "=" in name:  # --flag=value
            name, value = name.split("=", 1)
            words[i + 1:i + 1] = [value]
        if name in UNSUPPORTED_FLAGS:
            raise TrainRequestError(f"{where}: --{name}", f"a musubi-tuner flag this trainer does not support: "
                                                          f"{UNSUPPORTED_FLAGS[name]}")
        if name not in kinds:
            raise TrainRequestError(f"{where}: --{name}", f"unknown training flag{did_you_mean(name, list(kinds))}")
        kind, i = kinds[name], i + 1
        values = []
        while i < len(words) and not (words[i].startswith("--") and len(words[i]) > 2 and not _is_number(words[i])):
            values.append(words[i])
            i += 1
        if kind == "bool":
            if len(values) > 1 or (values and values[0].lower() not in ("true", "false", "1", "0")):
                raise TrainRequestError(f"{where}: --{name}", "a switch: give it alone (or true / false)")
            out[name] = not values or values[0].lower() in ("true", "1")
        elif kind == "list":
            out[name] = values
        else:
            if len(values) != 1:
                raise TrainRequestError(f"{where}: --{name}", f"takes one value, {len(values)} given")
            out[name] = _value(values[0], kind)
    return out


def _is_number(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


def _value(text: str, kind: str):
    """A flag's text as its kind reads it (the text unchanged when it is not one: TrainConfig names it)."""
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "int_or_float":
            if text.endswith("%"):
                return text
            value = float(text)
            return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value
    except ValueError:
        return text
    return text


# ---------------------------------------------------------------------------------------------
# Progress, as the queue panel shows it

TRAIN_PHASES = ("caching", "train")  # the ``expert`` of a training job's progress


def progress_words(p) -> str:
    """A training job's progress on one line: caching, or ``step 12/30 · 3.1 it/s · ETA 6 s``."""
    if p.expert == "caching":
        return f"caching latents and captions ({p.step}/{p.total})"
    rate = (p.total - p.step) / p.eta_s if p.eta_s > 0 else None
    speed = f" · {rate:.2f} it/s" if rate else ""
    return f"training step {p.step}/{p.total}{speed} · ETA {p.eta_s:.0f} s"
