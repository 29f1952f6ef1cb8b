"""Who may reach the server: the login pairs of ``--auth`` / ``--auth_file``, the warnings for a
server open to a network or the internet, and a free port to listen on.

Kept apart from the settings themselves (:mod:`wan.app.settings`): these read files and probe
sockets. A password is never part of a message.
"""

from __future__ import annotations

import errno
import socket
import sys
from pathlib import Path

from wan.app.settings import MAX_PORT, ServerSettings, SettingsError, check_value

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
        raise SettingsError(f"{path}: auth file not found (--auth_file)") from None
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
    return ("--share without --auth or --auth_file: anyone with the link can use this "
            "machine's GPU, upload files to it and read its outputs. Add --auth_file FILE "
            "(lines of user:password) to require a login.")


def listen_warning(settings: ServerSettings) -> str | None:
    """A warning when every network interface is served without any login; None otherwise."""
    if settings.host in ("127.0.0.1", "localhost", "::1") or settings.auth or settings.auth_file:
        return None
    return (f"listening on {settings.host} without --auth or --auth_file: anyone on this "
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
                                f"check --server_name / --listen / --server_port") from None
        note = None if candidate == port else f"port {port} is in use; using {candidate}"
        return candidate, note
    tried = f"{port}" if last == port else f"{port}-{last}"
    raise SettingsError(f"no free port on {host}: tried {tried}, all in use; "
                        f"choose another with --server_port N")


_IN_USE = {errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", errno.EADDRINUSE)}


def _probe(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if sys.platform != "win32":
            # like the server will: a port left in TIME_WAIT by a previous run counts as free,
            # a port another socket listens on does not (on Windows this option would steal it)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
