"""Server settings: one name per setting, from config file to flag to UI.

Each field of :class:`ServerSettings` has one name used everywhere: the YAML key of the config file
(``wan_studio.yaml`` in the current folder unless ``--config`` names another), the flag
(``server_port`` <-> ``--server_port``; a :class:`wan.flags.FlagParser` also reads ``--server-port``)
and the key the UI reads and writes.

Precedence: the defaults below < the config file < the flags actually given. Every setting flag
defaults to ``argparse.SUPPRESS``, so a flag that was not typed is absent from the namespace and
cannot mask the file, while a flag typed with the default's value still wins over the file.

Values are checked by :mod:`wan.config`: every bad value raises :class:`SettingsError` naming where
it came from (the file, a flag or the UI), the key, the value and what is allowed. The settings
that name something which must exist here (``profile``, ``model``) are checked against the
profiles and the registry by :func:`check_references`, at the start (a bad value from the file is
ignored with a warning, one from a flag is an error) and when the Settings tab saves. Each field
also carries its label in plain words for the Settings tab. This module imports neither gradio
nor torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from wan.config import Bool, ConfigError, choice, did_you_mean, integer, is_int, read_yaml, rule, section, validate
from wan.engine.request_checks import Limits
from wan.fileio import write_text_atomic as _write_atomic
from wan.optim.profiles import ATTENTION_BACKENDS

DEFAULT_CONFIG = "wan_studio.yaml"
MAX_PORT = 65535
def flag_name(key: str) -> str:
    """``server_port`` -> ``--server_port`` (a FlagParser reads ``--server-port`` as the same flag)."""
    return "--" + key


class SettingsError(ConfigError):
    """A server setting (config file, flag or UI value) is not allowed."""

    @classmethod
    def at(cls, where: str, key: str) -> str:
        return flag_name(key) if where == "flag" else super().at(where, key)

    @classmethod
    def show(cls, key: str, value: Any) -> str:
        # a password is never echoed into logs or the page
        return "(value not shown)" if key == "auth" and value is not None else super().show(key, value)

    @classmethod
    def unknown(cls, where: str, key: str, name: Any, known: Any) -> SettingsError:
        return cls(f"{where}: unknown setting {name!r}{did_you_mean(name, known)}; settings are: {', '.join(known)}")


def _plain_text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != "" and not any(ord(c) < 32 for c in v)


Text = rule("a non-empty string without control characters", _plain_text)
OptionalText = rule("a non-empty string without control characters", _plain_text, optional=True)
# YAML reads `profile: 4` as a number
ProfileRef = rule("a profile name or number (see: wgp.py profiles)", lambda v: is_int(v) or _plain_text(v), str,
                  optional=True)
Port = integer(1, MAX_PORT, words=f"a whole number from 1 to {MAX_PORT}")
Positive = integer(1, words="a whole number > 0")
Limit = integer(0, words="a whole number >= 0 (0: no limit)")
Attention = choice(("auto",) + ATTENTION_BACKENDS, optional=True)


_LIMITS = Limits()  # the request limits' defaults, shared with the command line (wan.engine.request_checks)


def _folders(v: Any) -> bool:
    items = [v] if isinstance(v, str) else v
    return isinstance(items, (list, tuple)) and all(_plain_text(x) for x in items)


# One folder (a string) or a list of them, kept as a tuple.
Folders = rule("a folder or a list of folders", _folders, lambda v: (v,) if isinstance(v, str) else tuple(v))

MAX_WORKERS = 16  # GPU indices, or CPU worker processes, one --gpus may name
GPU_MODES = ("split", "per_job")


def parse_gpus(value: Any) -> tuple[str, ...]:
    """The worker devices a ``gpus`` setting names: ``"0,1,2,3"`` -> ("0", "1", "2", "3");
    ``"cpu:2"`` -> ("cpu0", "cpu1"), two CPU worker processes (tests, machines without CUDA);
    ``"cpu"`` is ``"cpu:1"``. A YAML number (``gpus: 1``) or list (``gpus: [0, 1]``) is read too.

    Raises:
        ValueError: the value, in words (the settings check turns it into a SettingsError).
    """
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    elif is_int(value):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("not a list of GPUs")
    text = value.strip().lower()
    if text == "cpu" or text.startswith("cpu:"):
        count = text[4:].strip() or "1"
        if not count.isdigit() or not 1 <= int(count) <= MAX_WORKERS:
            raise ValueError(f"cpu:N wants N from 1 to {MAX_WORKERS}")
        return tuple(f"cpu{i}" for i in range(int(count)))
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError("GPU indices are whole numbers >= 0")
    indices = [str(int(p)) for p in parts]
    if len(set(indices)) != len(indices):
        raise ValueError("a GPU is named twice")
    if len(indices) > MAX_WORKERS:
        raise ValueError(f"at most {MAX_WORKERS} GPUs")
    return tuple(indices)


def gpus_text(devices: tuple[str, ...]) -> str:
    """The setting's stored form of :func:`parse_gpus`'s devices: ``"0,1"`` or ``"cpu:2"``."""
    if devices and devices[0].startswith("cpu"):
        return f"cpu:{len(devices)}"
    return ",".join(devices)


def _gpus(v: Any) -> bool:
    try:
        parse_gpus(v)
    except ValueError:
        return False
    return True


# e.g. "0,1,2,3", or "cpu:2" for CPU worker processes; kept in its plain form ("0,1" or "cpu:2")
Gpus = rule(f"GPU indices separated by commas (0,1,2,3; each at most once, at most {MAX_WORKERS}), or cpu:N "
            f"for N CPU worker processes (N from 1 to {MAX_WORKERS})", _gpus, lambda v: gpus_text(parse_gpus(v)),
            optional=True)
GpuMode = choice(GPU_MODES)


def _setting(default: Any, help: str, label: str) -> Any:
    """A field with its flag help (also the UI's description) and its label in plain words (the UI's)."""
    return dataclasses.field(default=default, metadata={"help": help, "label": label})


@section(frozen=False)
class ServerSettings:
    """Everything the web server needs to start. Field names are the config keys and flag names."""

    listen: Bool = _setting(False, "listen on all interfaces (0.0.0.0) instead of --server_name",
                            "Listen on all network interfaces")
    server_name: Text = _setting("127.0.0.1", "interface to listen on", "Network address to listen on")
    server_port: Port = _setting(7860, "port to listen on (the next free one is used if it is taken)", "Port")
    share: Bool = _setting(False, "create a public gradio.live link (use --auth or --auth_file with it)",
                           "Create a public share link")
    auth: OptionalText = _setting(None, "USER:PASSWORD required to open the app (never saved to the config file)",
                                  "User name and password")
    auth_file: OptionalText = _setting(None, "file with one USER:PASSWORD per line ('#' starts a comment line)",
                                       "Password file")
    profile: ProfileRef = _setting(None, "profile name or number used when a request names none "
                                         "(see: wgp.py profiles)", "Default profile")
    model: OptionalText = _setting(None, "model id selected when the page opens (see: wgp.py models)",
                                   "Model selected when the page opens")
    checkpoint_dir: Text = _setting("checkpoints", "folder of the model checkpoints", "Checkpoints folder")
    models_dir: Folders = _setting((), "a folder of model files you already have (ComfyUI's models/, Wan2GP's "
                                        "ckpts/, the Hugging Face cache, any folder), repeatable: files are "
                                        "recognised by their tensors and used instead of downloading",
                                   "Folders of model files you already have")
    lora_dir: Text = _setting("loras", "LoRA drop-in folder", "LoRA folder")
    output_dir: Text = _setting("outputs", "folder the generated files are written to", "Output folder")
    attention: Attention = _setting(None, "attention backend to prefer: " + ", ".join(("auto",) + ATTENTION_BACKENDS),
                                    "Preferred attention backend")
    compile: Bool = _setting(False, "compile the transformer blocks with torch.compile",
                             "Compile the transformer (torch.compile)")
    open_browser: Bool = _setting(False, "open the app in a browser once it is up", "Open a browser tab at start")
    verbose: Bool = _setting(False, "log more", "Detailed log")
    # limits on what one browser client may ask of this machine
    max_frames: Positive = _setting(_LIMITS.max_frames, "most frames one request may ask for",
                                    "Most frames per request")
    max_pixels: Positive = _setting(_LIMITS.max_pixels, "most pixels (width*height) of one frame a request may ask for",
                                    "Most pixels per frame")
    max_steps: Positive = _setting(_LIMITS.max_steps, "most denoising steps one request may ask for",
                                   "Most denoising steps per request")
    max_upload_mb: Positive = _setting(1024, "largest file a browser may upload, in MB", "Largest upload (MB)")
    max_queue: Positive = _setting(100, "most jobs waiting in the queue, all sessions together",
                                   "Most jobs waiting in the queue")
    state_dir: Text = _setting(".wan_studio", "folder of the queue file and uploads", "Queue and uploads folder")
    max_queue_per_session: Positive = _setting(20, "most jobs one session may have waiting when the server is "
                                                   "shared (--listen, --share or a non-local --server_name)",
                                               "Most waiting jobs per browser session")
    uploads_max_age_days: Limit = _setting(7, "uploads older than this many days are deleted (at start and after "
                                              "jobs), except those a waiting or running job uses; 0: no age limit",
                                           "Delete uploads after (days)")
    uploads_max_mb: Limit = _setting(10240, "the uploads folder is kept under this many MB by deleting the oldest "
                                            "uploads, except those a waiting or running job uses; 0: no size limit",
                                     "Largest size of the uploads folder (MB)")

    # -- the Train tab (wan/app/ui_train.py) ----------------------------------------------------
    datasets_dir: Text = _setting("datasets", "folder of the training datasets (folders of images and videos with "
                                              "captions, or musubi dataset TOMLs); the Train tab reads and writes "
                                              "captions only there and in the output folder", "Datasets folder")
    max_train_steps: Positive = _setting(20000, "most optimizer steps one training run may ask for",
                                         "Most training steps per run")
    # -- end of the Train tab's settings --------------------------------------------------------
    # -- GPU worker processes (wan/app/gpu_workers.py) ------------------------------------------
    gpus: Gpus = _setting(None, "run generations in worker processes on these GPUs, e.g. 0,1,2,3 (cpu:N: N CPU "
                                "processes, for tests and machines without CUDA); unset: in the server process",
                          "GPUs of the worker processes")
    gpu_mode: GpuMode = _setting("split", "how --gpus are used: split (each job split over all of them, one "
                                          "process group) or per_job (one worker per GPU, each running its own "
                                          "job from the queue)", "How the GPUs share the jobs")

    @property
    def host(self) -> str:
        """The interface to bind: every interface when ``listen`` is set."""
        return "0.0.0.0" if self.listen else self.server_name


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ServerSettings))
DEFAULTS = ServerSettings()
NOT_SAVED = ("auth",)  # a password in clear belongs in --auth_file, not in a file the UI rewrites


def check_value(key: str, value: Any, where: str) -> Any:
    """Checks one setting; ``where`` names its source ("wan_studio.yaml", "flag", "UI")."""
    return getattr(settings_from_dict({key: value}, where=where), key)


# ---------------------------------------------------------------------------------------------
# Settings that name something that must exist here: a profile, a model


REFERENCES = ("profile", "model")


def check_references(settings: ServerSettings, where: str = "settings",
                     keys: tuple[str, ...] | list[str] = REFERENCES) -> ServerSettings:
    """``settings`` with the ``profile`` and ``model`` among ``keys`` checked against what exists:
    the profile by name or number (as :meth:`ProfileSet.get` reads it), the model by registry id.

    Returns the settings with the profile stored under its name (``4`` -> ``LowRAM_LowVRAM``), the
    form the pickers list. A value naming nothing raises :class:`SettingsError` with ``where``,
    the key, the value and what is allowed. The type checks (:func:`settings_from_dict`) know
    nothing of the profile folders or the registry; this check does, so it runs where settings
    are used: at the server's start (:func:`load_settings`) and when the Settings tab saves.
    """
    changes = {}
    if "profile" in keys and settings.profile is not None:
        changes["profile"] = _profile_name(settings.profile, where)
    if "model" in keys and settings.model is not None:
        _check_model(settings.model, where)
    return dataclasses.replace(settings, **changes) if changes else settings


def _profile_name(ref: str, where: str) -> str:
    from wan.optim.profile_files import load_profiles
    from wan.optim.profiles import ProfileError
    try:
        profiles = load_profiles()
    except ProfileError as e:
        raise SettingsError.say(where, "profile",
                                f"{ref!r} cannot be checked: the profiles do not load ({e})") from None
    if ref in profiles:
        return profiles.get(ref).name
    allowed = (f"a profile name or number{did_you_mean(ref, profiles.names())}: "
               f"{', '.join(p.label for p in profiles)} (see: wgp.py profiles)")
    raise SettingsError.bad(where, "profile", ref, allowed)


def _check_model(model_id: str, where: str) -> None:
    from wan.registry import RegistryError, default_registry
    try:
        registry = default_registry()
    except RegistryError as e:
        raise SettingsError.say(where, "model",
                                f"{model_id!r} cannot be checked: the registry does not load ({e})") from None
    if model_id not in registry:
        ids = [m.id for m in registry.list()]  # real models first, as the pickers list them
        raise SettingsError.bad(where, "model", model_id, f"a model id{did_you_mean(model_id, ids)}: "
                                                           f"{', '.join(ids)} (see: wgp.py models)")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _usable_references(settings: ServerSettings, given: dict, file: str,
                       warn: Callable[[str], None]) -> ServerSettings:
    """The start's check of the references: a flag naming nothing is an error (it was just typed);
    a config file's value naming nothing (a profile since deleted, a model id of a removed
    finetune, or a file edited by hand) is ignored with a warning, so the server still starts and
    its pickers show a value they hold."""
    for key in REFERENCES:
        try:
            settings = check_references(settings, "flag" if key in given else file, keys=(key,))
        except SettingsError as e:
            if key in given:
                raise
            instead = "the default profile" if key == "profile" else "the first model"
            warn(f"{e}. It is ignored at this start ({instead} is used instead); "
                 f"pick another in the Settings tab or edit {file}")
            settings = dataclasses.replace(settings, **{key: getattr(DEFAULTS, key)})
    return settings


# ---------------------------------------------------------------------------------------------
# Dicts (for the UI) and the config file


def settings_to_dict(settings: ServerSettings, *, include_auth: bool = False) -> dict[str, Any]:
    """Every setting by name. ``auth`` is left out unless asked for, so a page never shows it."""
    data = dataclasses.asdict(settings)
    if not include_auth:
        data.pop("auth")
    return data


def settings_from_dict(data: dict[str, Any], base: ServerSettings | None = None,
                       where: str = "settings") -> ServerSettings:
    """``base`` (default: the defaults) with the values of ``data`` applied, every value checked."""
    if not isinstance(data, dict):
        raise SettingsError(f"{where}: expected a mapping of setting names to values, "
                            f"got {type(data).__name__}")
    checked = validate(ServerSettings, data, where, SettingsError)
    return dataclasses.replace(base or DEFAULTS, **{key: getattr(checked, key) for key in data})


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a config file ({} when empty). Values are checked by the caller."""
    if not Path(path).exists():
        raise SettingsError(f"{path}: config file not found (give an existing file to --config, "
                            f"or none to use {DEFAULT_CONFIG} when it exists)")
    return read_yaml(path, SettingsError)


def load_settings(args: argparse.Namespace, warn: Callable[[str], None] = _warn) -> ServerSettings:
    """Defaults < config file (``args.config``, or ``wan_studio.yaml`` if it exists) < flags given.

    The profile and model are then checked against the profiles and the registry
    (:func:`check_references`): a bad one from a flag raises, a bad one from the file is passed to
    ``warn`` (printed to stderr by default) and replaced by its default."""
    config = getattr(args, "config", None)
    path = Path(config if config is not None else DEFAULT_CONFIG)
    settings = ServerSettings()
    if config is not None or path.is_file():  # a file named explicitly must exist
        settings = settings_from_dict(read_config(path), base=settings, where=str(path))
    given = {key: getattr(args, key) for key in FIELD_NAMES if hasattr(args, key)}
    settings = settings_from_dict(given, base=settings, where="flag")
    return _usable_references(settings, given, str(path), warn)


def save_settings(settings: ServerSettings, path: str | os.PathLike) -> Path:
    """Writes the settings that differ from the defaults to ``path`` atomically; returns the path.

    ``auth`` is never written (a password belongs in --auth_file). If the file being replaced
    holds an ``auth`` line that the user wrote there, it is kept: saving from the UI must never
    remove the password protection of the next start.
    """
    path = Path(path)
    checked = settings_from_dict(settings_to_dict(settings, include_auth=True), where="settings to save")
    data = {k: v for k, v in settings_to_dict(checked).items() if v != getattr(DEFAULTS, k)}
    kept = _existing_auth(path)
    if kept is not None:
        data["auth"] = kept
    header = ("# Wan Studio server settings (python wgp.py serve). Flags override these values.\n"
              "# Only values that differ from the defaults are listed. Passwords are not written here:\n"
              "# put 'user:password' lines in a file and name it with auth_file / --auth_file.\n")
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True) if data else ""
    _write_atomic(path, header + body)
    return path


def _existing_auth(path: Path) -> str | None:
    try:
        value = read_yaml(path, SettingsError).get("auth")
    except SettingsError:
        return None
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------------------------------------
# Flags


class _Switch(argparse.Action):
    """``--share`` sets a setting true and ``--no_share`` false (a FlagParser reads ``--no-share`` too)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        super().__init__([*option_strings, "--no_" + option_strings[0][2:]], dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no_"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _flag_type(key: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that converts then applies the same check as the config file."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = text
        try:
            return check_value(key, value, "flag")
        except SettingsError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    parse.__name__ = key  # argparse names the type in some messages
    return parse


def add_server_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--config`` and one flag per setting. Setting flags default to ``SUPPRESS``."""
    parser.add_argument("--config", default=None, metavar="PATH",
                        help=f"YAML file of settings (default: {DEFAULT_CONFIG} in the current folder "
                             f"when it exists); flags given override it")
    for f in dataclasses.fields(ServerSettings):
        shown = f" (default: {f.default})" if f.default is not None else ""
        help_text = f.metadata["help"].replace("%", "%%") + shown
        if isinstance(f.default, bool):
            parser.add_argument(flag_name(f.name), action=_Switch, default=argparse.SUPPRESS, help=help_text)
        elif isinstance(f.default, tuple):  # a list setting: the flag is repeated
            parser.add_argument(flag_name(f.name), action="append", default=argparse.SUPPRESS, metavar="DIR",
                                help=help_text.replace(" (default: ())", ""))
        else:
            convert = int if isinstance(f.default, int) else str
            parser.add_argument(flag_name(f.name), type=_flag_type(f.name, convert),
                                default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)
    return parser
