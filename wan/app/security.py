"""What the web server may read and write on behalf of a browser.

A browser client is not trusted: through the page or ``gradio_client`` it can send any string
where the UI expects a name, a path or a number. This module is the one place that decides:

- ``check_name``: a user-given name (LoRA, preset, job label) that becomes one file name in a
  folder we own, so it can never name a path.
- ``is_inside``: whether a path lies in a folder once symlinks are resolved.
- ``store_upload``: an uploaded file is copied under a random name with a whitelisted suffix;
  the browser's file name never becomes a path.
- ``accept_request``: a client's request as the server queues it, checked with the server's
  limits on the resolved request (``limits_of``) and ``check_request_paths``: which files it may
  read (uploads, outputs) and write (the output folder).
- ``allowed_paths`` / ``blocked_paths``: what gradio may serve.

No gradio or torch import here: the request types are imported only when a request is checked.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import unicodedata
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wan.app.settings import ServerSettings
    from wan.engine.request import GenerationRequest

MAX_NAME_CHARS = 120
MAX_NAME_BYTES = 240  # UTF-8; leaves room for a suffix under the usual 255-byte file name limit
NAME_RULE = (f"a plain name of 1-{MAX_NAME_CHARS} characters: no '/' or '\\', no control characters, "
             "none of < > : \" | ? *, not '.' or '..', not starting with '.', '~' or a space, "
             "not ending with '.' or a space")
# Characters Windows refuses in file names (':' also rules out drive letters and NTFS streams).
_FORBIDDEN = set('/\\<>:"|?*')
# Bidirectional overrides can make a name display as something else ("gpj.exe" shown reversed).
_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}

UPLOAD_SUFFIXES: dict[str, tuple[str, ...]] = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".bmp"),
    "video": (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"),
    "lora": (".safetensors",),
    "any-output": (".mp4", ".png", ".jpg", ".webp", ".json"),
}
UPLOADS_FOLDER = "uploads"
_UUID_NAME = re.compile(r"^[0-9a-f]{32}\.[a-z0-9]+$")


# ---------------------------------------------------------------------------------------------
# Names


def _short_repr(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def check_name(name: str, what: str) -> str:
    """Returns ``name`` if it is safe as one file name inside its folder, else raises ValueError.

    The rule is that of ``wan.lora.library.check_preset_name`` (which this does not import: the
    library pulls in torch), plus a leading '~', bidirectional overrides, Windows device names
    (CON, NUL, ...) and a byte limit. ``what`` says what the name is for ("LoRA name").
    """
    problem = _name_problem(name)
    if problem:
        raise ValueError(f"{what} {_short_repr(name)} is not allowed ({problem}); expected {NAME_RULE}")
    return name


def _name_problem(name) -> str | None:
    if not isinstance(name, str):
        return f"a {type(name).__name__}, not a string"
    if not name:
        return "empty"
    if len(name) > MAX_NAME_CHARS:
        return f"{len(name)} characters"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"{len(name.encode('utf-8', 'surrogatepass'))} bytes in UTF-8, at most {MAX_NAME_BYTES}"
    if name in (".", ".."):
        return "a folder reference"
    bad = [c for c in name if c in _FORBIDDEN or c in _BIDI or unicodedata.category(c) in ("Cc", "Cs")]
    if bad:
        return f"has the character {bad[0]!r}"
    if name[0] in ".~ ":
        return f"starts with {name[0]!r}"
    if name[-1] in ". ":
        return f"ends with {name[-1]!r}"
    if name.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        return "a Windows device name"
    return None


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when ``path`` is ``folder`` or lies under it once both are fully resolved.

    Symlinks are followed, so a link inside the folder that points outside is not inside;
    ``..`` parts are resolved too. The paths need not exist.
    """
    real_path = Path(os.path.realpath(Path(path).expanduser()))
    real_folder = Path(os.path.realpath(Path(folder).expanduser()))
    return real_path == real_folder or real_folder in real_path.parents


# ---------------------------------------------------------------------------------------------
# Uploads


def uploads_dir(settings: ServerSettings) -> Path:
    """The absolute folder uploads are copied to: ``<state_dir>/uploads``."""
    return Path(os.path.realpath(Path(settings.state_dir).expanduser() / UPLOADS_FOLDER))


def _upload_suffix(name: str, kind: str) -> str:
    allowed = UPLOAD_SUFFIXES[kind]
    # only the last component matters, whichever separator the browser's OS uses
    last = re.split(r"[/\\]", name)[-1]
    suffix = PurePosixPath(last).suffix.lower() if last not in (".", "..") else ""
    if suffix not in allowed:
        raise ValueError(f"upload {_short_repr(name)} is not accepted as {kind}: its suffix is "
                         f"{suffix or 'missing'}; allowed: {', '.join(allowed)}")
    return suffix


def store_upload(src: str | os.PathLike, uploads_dir: Path, kind: str, max_bytes: int,
                 original_name: str | None = None) -> Path:
    """Copies an uploaded file to ``uploads_dir/<hex><suffix>``; returns that absolute path.

    The name is the first 32 hex digits of the content's SHA-256: unguessable without the
    content itself, and the same picture sent twice (every "Add" re-sends the form) is stored once.

    Args:
        src: the file gradio received (in its temp folder).
        kind: "image", "video", "lora" or "any-output"; decides the allowed suffixes.
        max_bytes: larger files are refused.
        original_name: the browser's file name when gradio gives it apart from ``src``
            (``FileData.orig_name``); default ``src``'s own name. Only its suffix is used, after
            checking it against the kind's whitelist: the name itself never becomes a path.
    The copy is written under a temp name and renamed, so a half-copied file is never visible.
    """
    if kind not in UPLOAD_SUFFIXES:
        raise ValueError(f"upload kind {kind!r} is unknown; kinds: {', '.join(UPLOAD_SUFFIXES)}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a whole number > 0, got {max_bytes!r}")
    src = Path(src)
    name = original_name if original_name is not None else src.name
    suffix = _upload_suffix(name, kind)
    if not src.is_file():
        raise ValueError(f"upload {_short_repr(name)}: {src} is not a readable file")
    size = src.stat().st_size
    if size > max_bytes:
        raise ValueError(f"upload {_short_repr(name)} is {size / 2**20:.1f} MB; the limit is "
                         f"{max_bytes / 2**20:.1f} MB (--max_upload_mb)")
    if size == 0:
        raise ValueError(f"upload {_short_repr(name)} is empty (0 bytes)")
    folder = Path(os.path.realpath(Path(uploads_dir).expanduser()))
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            digest = _copy_limited(inp, out, max_bytes, name)
            out.flush()
            os.fsync(out.fileno())
        final = folder / f"{digest[:32]}{suffix}"
        if final.is_file():  # already stored: same content, same name; fresh again for pruning by age
            Path(tmp).unlink()
            os.utime(final)
        else:
            os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def _copy_limited(inp, out, max_bytes: int, name: str) -> str:
    """Copies in chunks, stopping if the source grows past the limit while it is read; returns
    the SHA-256 hex digest of what was copied."""
    copied, digest = 0, hashlib.sha256()
    while chunk := inp.read(1 << 20):
        copied += len(chunk)
        if copied > max_bytes:
            raise ValueError(f"upload {_short_repr(name)} grew past the limit of "
                             f"{max_bytes / 2**20:.1f} MB while it was copied (--max_upload_mb)")
        out.write(chunk)
        digest.update(chunk)
    return digest.hexdigest()


def is_stored_upload(path: str | os.PathLike, settings: ServerSettings) -> bool:
    """True for a file ``store_upload`` wrote into this server's uploads folder."""
    path = Path(path)
    return _UUID_NAME.match(path.name) is not None and is_inside(path, uploads_dir(settings))


# ---------------------------------------------------------------------------------------------
# Requests


def limits_of(settings: ServerSettings):
    """The request limits this server's settings set (:class:`wan.engine.request_checks.Limits`)."""
    from wan.engine.request_checks import Limits
    return Limits.of(settings)


def accept_request(data, state) -> GenerationRequest:
    """A client's request (a mapping, as sent to ``/queue_job``, or a request the form built) as this
    server will queue it, fully checked: the same checks as the job itself will run, with this
    server's limits on the resolved request (defaults filled, sizes derived) and its paths.

    Raises:
        RequestError: naming the field, the value (cut short) and what is allowed. Nothing else,
        whatever ``data`` holds.
    """
    from wan.engine.request import GenerationRequest, RequestError, resolve_request
    from wan.engine.request_checks import check_field_types
    request = data if isinstance(data, GenerationRequest) else GenerationRequest.from_dict(data)
    check_field_types(request)  # before any path is looked at
    if isinstance(data, dict) and "output_dir" in data and not (
            isinstance(request.output_dir, str) and is_inside(request.output_dir, state.output_dir)):
        raise RequestError("output_dir", request.output_dir,
                           f"the server's output folder {state.output_dir} or a folder inside it")
    prepared = state.prepare(request)
    resolved, spec = resolve_request(prepared, limits=limits_of(state.settings))
    ready = state.readiness(spec, estimate=True)
    if not ready.ready:  # refused now, not after a failed download in the worker
        raise RequestError("model", spec.id, "a model that is ready on this machine. " + ready.refusal(
            spec.id, ways="the Download button under the model picker"))
    _refuse_offline_accelerators(resolved, spec, state)
    return prepared


def _refuse_offline_accelerators(resolved: GenerationRequest, spec, state) -> None:
    """A registry accelerator LoRA the job would download on first use cannot come while
    HF_HUB_OFFLINE is set: refused when added, with where its file goes."""
    from wan.engine.accelerators import missing_accelerator_loras
    from wan.engine.request import RequestError
    from wan.loading.download import is_offline
    from wan.lora.library import family_for_model
    from wan.registry import default_registry
    if not is_offline():
        return
    folder = Path(state.settings.lora_dir)
    for entry in missing_accelerator_loras(resolved, spec, default_registry(), folder):
        names = {role: entry.lora_name(role, family_for_model(spec)) for role in entry.files}
        missing = [f"{source.files[0]} from {source.repo} at {folder / names[role]}"
                   for role, source in entry.files.items() if not (folder / names[role]).is_file()]
        raise RequestError("loras", names[next(iter(names))],
                           f"a LoRA present in the LoRA folder: HF_HUB_OFFLINE is set, so the accelerator LoRA "
                           f"{entry.id} cannot be downloaded on first use. Unset it, run python wgp.py download "
                           f"{entry.id}, or put " + "; and ".join(missing))


def check_request_paths(request: GenerationRequest, settings: ServerSettings) -> None:
    """Refuses a request from the browser that reads or writes files outside what it may use.

    Input files must lie in the uploads folder (see ``store_upload``) or the output folder (to
    reuse a result); the output folder must be ``settings.output_dir`` or a folder inside it;
    a LoRA is a name inside the LoRA folder (``style/anime_v2``) or an uploaded ``.safetensors``.

    Raises:
        RequestError: naming the field and the refused value.
    """
    from wan.engine.request import RequestError

    readable = allowed_paths(settings)
    from wan.engine.request import INPUT_FIELDS  # plain data, no torch
    for field_name in INPUT_FIELDS:
        value = getattr(request, field_name)
        for path in [value] if isinstance(value, str) else value or []:
            if not isinstance(path, str) or not any(is_inside(path, folder) for folder in readable):
                raise RequestError(field_name, path, f"a file uploaded through the app or one in the "
                                                     f"output folder ({', '.join(readable)})")
    if not isinstance(request.output_dir, str) or not is_inside(request.output_dir, _real(settings.output_dir)):
        raise RequestError("output_dir", request.output_dir,
                           f"the output folder {_real(settings.output_dir)} or a folder inside it")
    for lora in request.loras:
        if isinstance(lora.path, str) and is_stored_upload(lora.path, settings):
            continue
        parts = lora.path.split("/") if isinstance(lora.path, str) else [lora.path]
        problems = [p for p in (_name_problem(part) for part in parts) if p]
        if problems:
            raise RequestError("loras", lora.path, f"a LoRA name inside the LoRA folder, parts "
                                                   f"separated by '/', each {NAME_RULE} ({problems[0]})")


# ---------------------------------------------------------------------------------------------
# Training (the Train tab, wan/app/train_*.py): the folders a training request may read and write


def train_roots(settings: ServerSettings) -> list[Path]:
    """The folders a training request may name, resolved: the datasets folder (``datasets_dir``:
    datasets, their captions, TOMLs and caches) and the output folder (runs, their states and
    samples). Nothing else is read or written for a training job on behalf of a browser."""
    return [Path(_real(settings.datasets_dir)), Path(_real(settings.output_dir))]


def check_train_path(path, settings: ServerSettings, what: str) -> Path:
    """``path`` resolved (a relative one is taken inside ``datasets_dir``) when it lies inside
    :func:`train_roots`; else ValueError naming ``what``, the path and the allowed folders."""
    roots = train_roots(settings)
    if not isinstance(path, str) or not path.strip() or "\0" in path or not path.isprintable():
        raise ValueError(f"{what}: {_short_repr(path)} is not allowed; a folder or file inside "
                         f"{' or '.join(map(str, roots))}")
    given = Path(path.strip()).expanduser()
    full = given if given.is_absolute() else roots[0] / given
    if not any(is_inside(full, root) for root in roots):
        raise ValueError(f"{what}: {_short_repr(path)} is outside the folders training may use; "
                         f"a folder or file inside {' or '.join(map(str, roots))}")
    return Path(os.path.realpath(full))


# ---------------------------------------------------------------------------------------------
# What gradio may serve


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(Path(path).expanduser())


def allowed_paths(settings: ServerSettings) -> list[str]:
    """Folders gradio may serve (its ``launch(allowed_paths=...)``), absolute and resolved.

    Only the outputs (shown in the gallery) and the uploads (shown back as inputs). Gradio 5+
    serves nothing else besides its own temp files: not the current folder, so neither the
    checkpoints nor ``state_dir`` (the queue file holds every user's prompts) are reachable.
    """
    return [_real(settings.output_dir), str(uploads_dir(settings))]


def blocked_paths(settings: ServerSettings, config_path: str | os.PathLike | None = None) -> list[str]:
    """Paths gradio must never serve (``launch(blocked_paths=...)``), absolute and resolved.

    Blocking wins over allowing in gradio, so these stay private even when an allowed folder
    contains them (an ``output_dir`` of "." for instance): the checkpoints (large, often
    licensed), the LoRA folder, the profile folders, the config file and the auth file
    (passwords). ``state_dir`` is not blocked as a whole since it holds the allowed uploads;
    it is simply never allowed. ``config_path`` defaults to ``wan_studio.yaml`` here.
    """
    from wan.app.settings import DEFAULT_CONFIG
    from wan.optim.profile_files import BUILTIN_DIR, DEFAULT_USER_DIR  # yaml only, no torch

    paths = [settings.checkpoint_dir, settings.lora_dir, BUILTIN_DIR, DEFAULT_USER_DIR,
             config_path if config_path is not None else DEFAULT_CONFIG]
    if settings.auth_file:
        paths.append(settings.auth_file)
    return list(dict.fromkeys(_real(p) for p in paths))
