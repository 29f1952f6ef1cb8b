"""Server settings: one name per setting, from config file to flag to UI.

Each field of :class:`ServerSettings` has one name used everywhere: the YAML key of the config file
(``wan_studio.yaml`` in the current folder unless ``--config`` names another), the flag with ``_``
written ``-`` (``server_port`` <-> ``--server-port``) and the key the UI reads and writes.

Precedence: the defaults below < the config file < the flags actually given. Every setting flag
defaults to ``argparse.SUPPRESS``, so a flag that was not typed is absent from the namespace and
cannot mask the file, while a flag typed with the default's value still wins over the file.

Every bad value raises :class:`SettingsError` naming where it came from (the file, a flag or the
UI), the key, the value and what is allowed. This module imports neither gradio nor torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import yaml

from wan.fileio import write_text_atomic as _write_atomic

DEFAULT_CONFIG = "wan_studio.yaml"
MAX_PORT = 65535


class SettingsError(ValueError):
    """A server setting (config file, flag or UI value) is not allowed."""


@dataclass
class ServerSettings:
    """Everything the web server needs to start. Field names are the config keys and flag names."""

    listen: bool = False                 # listen on all interfaces (0.0.0.0) instead of server_name
    server_name: str = "127.0.0.1"
    server_port: int = 7860
    share: bool = False                  # a public gradio.live link
    auth: str | None = None              # "user:password"; never saved by save_settings
    auth_file: str | None = None         # one "user:password" per line, '#' starts a comment line
    profile: str | None = None           # profile name or number used when a request names none
    model: str | None = None             # model id selected when the page opens
    checkpoint_dir: str = "checkpoints"
    lora_dir: str = "loras"
    output_dir: str = "outputs"
    attention: str | None = None         # attention backend to prefer (sdpa, sage, flash2, ... or auto)
    compile: bool = False                # torch.compile the transformer blocks
    open_browser: bool = False
    verbose: bool = False
    # limits on what one browser client may ask of this machine
    max_frames: int = 161
    max_pixels: int = 1280 * 720         # width * height of one frame
    max_upload_mb: int = 1024
    max_queue: int = 100                 # jobs waiting in the queue, all sessions together
    state_dir: str = ".wan_studio"       # the queue file and uploads/ live here

    @property
    def host(self) -> str:
        """The interface to bind: every interface when ``listen`` is set."""
        return "0.0.0.0" if self.listen else self.server_name


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ServerSettings))
DEFAULTS = ServerSettings()
NOT_SAVED = ("auth",)  # a password in clear belongs in --auth-file, not in a file the UI rewrites


# ---------------------------------------------------------------------------------------------
# Value checks: each returns the value in its stored form or raises _Bad(allowed)


class _Bad(Exception):
    def __init__(self, allowed: str):
        super().__init__(allowed)
        self.allowed = allowed


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad("true or false")
    return v


def _text(v: Any) -> str:
    if not isinstance(v, str) or not v.strip() or any(ord(c) < 32 for c in v):
        raise _Bad("a non-empty string without control characters")
    return v


def _optional_text(v: Any) -> str | None:
    return None if v is None else _text(v)


def _profile(v: Any) -> str | None:
    if isinstance(v, int) and not isinstance(v, bool):  # YAML reads `profile: 4` as a number
        v = str(v)
    try:
        return _optional_text(v)
    except _Bad:
        raise _Bad("a profile name or number (see: wgp.py profiles), or null") from None


def _port(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_PORT:
        raise _Bad(f"a whole number from 1 to {MAX_PORT}")
    return v


def _positive(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise _Bad("a whole number > 0")
    return v


def _attention(v: Any) -> str | None:
    from wan.optim.profiles import ATTENTION_BACKENDS  # yaml only; kept lazy all the same
    names = ("auto",) + ATTENTION_BACKENDS
    if v is not None and v not in names:
        raise _Bad(f"one of: {', '.join(names)}, or null")
    return v


CHECKS: dict[str, Callable[[Any], Any]] = {
    "listen": _bool, "server_name": _text, "server_port": _port, "share": _bool,
    "auth": _optional_text, "auth_file": _optional_text, "profile": _profile, "model": _optional_text,
    "checkpoint_dir": _text, "lora_dir": _text, "output_dir": _text, "attention": _attention,
    "compile": _bool, "open_browser": _bool, "verbose": _bool,
    "max_frames": _positive, "max_pixels": _positive, "max_upload_mb": _positive, "max_queue": _positive,
    "state_dir": _text,
}
assert set(CHECKS) == set(FIELD_NAMES), "every setting needs a check"


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def _shown(key: str, value: Any) -> str:
    # a password is never echoed into logs or the page
    return "(value not shown)" if key == "auth" and value is not None else repr(value)


def check_value(key: str, value: Any, where: str) -> Any:
    """Checks one setting; ``where`` names its source ("wan_studio.yaml", "flag", "UI")."""
    if key not in CHECKS:
        near = difflib.get_close_matches(key.replace("-", "_") if isinstance(key, str) else str(key),
                                         FIELD_NAMES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SettingsError(f"{where}: unknown setting {key!r}{hint}; settings are: {', '.join(FIELD_NAMES)}")
    try:
        return CHECKS[key](value)
    except _Bad as bad:
        label = flag_name(key) if where == "flag" else f"{where}: {key}"
        raise SettingsError(f"{label}: {_shown(key, value)} is not allowed; expected {bad.allowed}") from None


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
    values = dataclasses.asdict(base) if base is not None else {}
    for key, value in data.items():
        values[key] = check_value(key, value, where)
    return ServerSettings(**values)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a config file ({} when empty). Values are checked by the caller."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"{path}: config file not found (give an existing file to --config, "
                            f"or none to use {DEFAULT_CONFIG} when it exists)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path}: cannot read the config file ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of setting names to values "
                            f"(server_port: 7860), got {type(data).__name__}")
    return data


def load_settings(args: argparse.Namespace) -> ServerSettings:
    """Defaults < config file (``args.config``, or ``wan_studio.yaml`` if it exists) < flags given."""
    config = getattr(args, "config", None)
    path = Path(config if config is not None else DEFAULT_CONFIG)
    settings = ServerSettings()
    if config is not None or path.is_file():  # a file named explicitly must exist
        settings = settings_from_dict(read_config(path), base=settings, where=str(path))
    given = {key: getattr(args, key) for key in FIELD_NAMES if hasattr(args, key)}
    return settings_from_dict(given, base=settings, where="flag")


def save_settings(settings: ServerSettings, path: str | os.PathLike) -> Path:
    """Writes the settings that differ from the defaults to ``path`` atomically; returns the path.

    ``auth`` is never written (a password belongs in --auth-file). If the file being replaced
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
              "# put 'user:password' lines in a file and name it with auth_file / --auth-file.\n")
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True) if data else ""
    _write_atomic(path, header + body)
    return path


def _existing_auth(path: Path) -> str | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    value = data.get("auth") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------------------------------------
# Flags

_HELP = {
    "listen": "listen on all interfaces (0.0.0.0) instead of --server-name",
    "server_name": "interface to listen on",
    "server_port": "port to listen on (the next free one is used if it is taken)",
    "share": "create a public gradio.live link (use --auth or --auth-file with it)",
    "auth": "USER:PASSWORD required to open the app (never saved to the config file)",
    "auth_file": "file with one USER:PASSWORD per line ('#' starts a comment line)",
    "profile": "profile name or number used when a request names none (see: wgp.py profiles)",
    "model": "model id selected when the page opens (see: wgp.py models)",
    "checkpoint_dir": "folder of the model checkpoints",
    "lora_dir": "LoRA drop-in folder",
    "output_dir": "folder the generated files are written to",
    "attention": "attention backend to prefer: auto, sdpa, sage, sage2, flash2, flash3, xformers",
    "compile": "torch.compile the transformer blocks",
    "open_browser": "open the app in a browser once it is up",
    "verbose": "log more",
    "max_frames": "most frames one request may ask for",
    "max_pixels": "most pixels (width*height) of one frame a request may ask for",
    "max_upload_mb": "largest file a browser may upload, in MB",
    "max_queue": "most jobs waiting in the queue",
    "state_dir": "folder of the queue file and uploads",
}


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
        default = getattr(DEFAULTS, f.name)
        shown = f" (default: {default})" if default is not None else ""
        help_text = _HELP[f.name].replace("%", "%%") + shown
        if isinstance(default, bool):
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            convert = int if isinstance(default, int) else str
            parser.add_argument(flag_name(f.name), type=_flag_type(f.name, convert),
                                default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)
    return parser


# ---------------------------------------------------------------------------------------------
# Auth, warnings, port


def read_auth(settings: ServerSettings) -> list[tuple[str, str]] | None:
    """The (user, password) pairs from ``auth`` and ``auth_file``; None when neither is set.

    A password is never part of an error message. Lines are stripped; empty lines and lines
    starting with '#' are skipped; the first ':' splits user from password.
    """
    pairs: list[tuple[str, str]] = []
    if settings.auth is not None:
        pair = _split_auth(settings.auth)
        if pair is None:
            raise SettingsError("--auth: expected USER:PASSWORD with both parts non-empty (value not shown)")
        pairs.append(pair)
    if settings.auth_file is not None:
        pairs.extend(_read_auth_file(Path(settings.auth_file)))
    return pairs or None


def _split_auth(text: str) -> tuple[str, str] | None:
    user, sep, password = text.partition(":")
    user = user.strip()
    if not sep or not user or not password:
        return None
    return user, password


def _read_auth_file(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SettingsError(f"{path}: auth file not found (--auth-file)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path}: cannot read the auth file ({type(e).__name__})") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pair = _split_auth(line)
        if pair is None:
            raise SettingsError(f"{path}, line {number}: expected USER:PASSWORD with both parts non-empty "
                                f"(line not shown)")
        pairs.append(pair)
    if not pairs:
        # an empty auth file would silently leave the server open
        raise SettingsError(f"{path}: the auth file has no USER:PASSWORD line")
    return pairs


def share_warning(settings: ServerSettings) -> str | None:
    """A warning when a public link is made without any login; None otherwise.

    The text has no "warning:" prefix: the caller prints it with its own.
    """
    if not settings.share or settings.auth or settings.auth_file:
        return None
    return ("--share without --auth or --auth-file: anyone with the link can use this "
            "machine's GPU, upload files to it and read its outputs. Add --auth-file FILE "
            "(lines of user:password) to require a login.")


def listen_warning(settings: ServerSettings) -> str | None:
    """A warning when every network interface is served without any login; None otherwise."""
    if settings.host in ("127.0.0.1", "localhost", "::1") or settings.auth or settings.auth_file:
        return None
    return (f"listening on {settings.host} without --auth or --auth-file: anyone on this "
            f"network can use the app and read its outputs.")


def find_port(host: str, port: int, tries: int = 20) -> tuple[int, str | None]:
    """The first port of ``port .. port+tries`` that can be bound on ``host``, and a note if moved.

    Another process can still take the port between this check and the server's own bind; the
    server then fails with its own error. Raises SettingsError when every port tried is in use or
    the host cannot be bound at all.
    """
    port = check_value("server_port", port, "flag")
    last = min(port + max(tries, 0), MAX_PORT)
    for candidate in range(port, last + 1):
        try:
            _probe(host, candidate)
        except OSError as e:
            if e.errno in _IN_USE:
                continue
            raise SettingsError(f"cannot listen on {host}:{candidate} ({e.strerror or e}); "
                                f"check --server-name / --listen / --server-port") from None
        note = None if candidate == port else f"port {port} is in use; using {candidate}"
        return candidate, note
    tried = f"{port}" if last == port else f"{port}-{last}"
    raise SettingsError(f"no free port on {host}: tried {tried}, all in use; "
                        f"choose another with --server-port N")


_IN_USE = {errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", errno.EADDRINUSE)}


def _probe(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if sys.platform != "win32":
            # like the server will: a port left in TIME_WAIT by a previous run counts as free,
            # a port another socket listens on does not (on Windows this option would steal it)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
