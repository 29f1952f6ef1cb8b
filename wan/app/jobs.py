"""A job of the web app's queue as data: its record and progress, what its runner returns, how it is
read back from the queue file, and the text of it that the page shows.

The queue itself (order, the worker, persistence) is :mod:`wan.app.jobqueue`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine (and torch) load in the worker, when the first job runs
    from wan.engine.loop import CancelToken  # noqa: F401 - named in Runner

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
FILE_VERSION = 1
LABEL_PROMPT_CHARS = 60
MAX_ERROR_CHARS = 4000  # a whole error with its line breaks (a list of missing keys, say), still bounded
MAX_ID_CHARS = 64
MAX_SESSION_CHARS = 128
MAX_REQUEST_DEPTH = 32  # a request is a flat dict of fields with small lists and dicts inside
MAX_DEVICES = 64  # GPUs named in one job's placement (``Job.gpus``)
CPU_PREFIX = "cpu"  # a CPU worker process's device name: "cpu0", "cpu1", ... (GPUs are "0", "1", ...)


@dataclass
class JobProgress:
    """Where the running job is: the last finished step (kept in memory only)."""

    step: int
    total: int
    expert: str
    eta_s: float
    elapsed_s: float
    preview: str | None = None  # path of a preview image of the current latent, when the runner makes one
    window: int = 1    # sliding windows: the window this step belongs to (1-based) ...
    windows: int = 1   # ... of how many (1: a plain run)


@dataclass
class RunOutcome:
    """What a runner returns for a job that finished."""

    files: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


@dataclass
class Job:
    """One queued generation. ``request`` is ``GenerationRequest.to_dict()`` as submitted."""

    id: str
    session: str
    request: dict
    label: str
    status: str = "queued"
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    files: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    progress: JobProgress | None = None
    restarts: int = 0
    # where the job runs or ran: the devices of its worker process(es) ("0", "1" for GPUs, "cpu0"...
    # for CPU workers, see --gpus); empty when it runs in the server process
    gpus: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-ready data; ``progress`` is not included (it is not persisted)."""
        return copy.deepcopy(self._record())

    def _record(self) -> dict:
        """The persisted fields, not copied (for json.dumps under the queue's lock). An empty
        ``gpus`` is left out, so a queue that never used GPU workers stays readable by the versions
        before them."""
        return {name: getattr(self, name) for name in _PERSISTED if name != "gpus" or self.gpus}

    @classmethod
    def from_dict(cls, data: dict) -> Job:
        """Rebuilds a job from :meth:`to_dict`. Raises ValueError naming a bad or unknown field."""
        if not isinstance(data, dict):
            raise ValueError(f"job: {type(data).__name__} is not allowed; a JSON object")
        def show(value) -> str:  # a value from a file, short and printable in a log line
            return printable(repr(value), 80)
        known = set(_PERSISTED)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"job field {show(unknown[0])} is not known; fields are: {', '.join(sorted(known))}")
        for name, kind in (("id", str), ("session", str), ("request", dict), ("label", str), ("status", str)):
            if not isinstance(data.get(name), kind):
                raise ValueError(f"job field {name!r}: {show(data.get(name))} is not allowed; a {kind.__name__}")
        if not 0 < len(data["id"]) <= MAX_ID_CHARS or not data["id"].isprintable():
            raise ValueError(f"job id {show(data['id'])} is not allowed; 1 to {MAX_ID_CHARS} printable characters")
        if too_deep(data["request"]):
            raise ValueError(f"job {data['id']} request: nested more than {MAX_REQUEST_DEPTH} levels deep")
        if data["status"] not in STATUSES:
            raise ValueError(f"job {data['id']} status: {show(data['status'])} is not allowed; "
                             f"one of {', '.join(STATUSES)}")
        for name in ("files", "notices"):
            value = data.get(name, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"job {data['id']} field {name!r}: {show(value)} is not allowed; a list of strings")
        for name, optional in (("created", False), ("started", True), ("finished", True)):
            value = data.get(name, None if optional else 0.0)
            if not (optional and value is None) and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ValueError(f"job {data['id']} field {name!r}: {show(value)} is not allowed; a time in seconds")
        if not isinstance(data.get("error"), (str, type(None))):
            raise ValueError(f"job {data['id']} field 'error': {show(data['error'])} is not allowed; text or null")
        restarts = data.get("restarts", 0)
        if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 0:
            raise ValueError(f"job {data['id']} restarts: {show(restarts)} is not allowed; a whole number >= 0")
        gpus = data.get("gpus", [])  # absent in files written before the GPU workers
        if (not isinstance(gpus, list) or len(gpus) > MAX_DEVICES
                or not all(isinstance(g, str) and 0 < len(g) <= 16 and g.isprintable() for g in gpus)):
            raise ValueError(f"job {data['id']} field 'gpus': {show(gpus)} is not allowed; a list of at most "
                             f"{MAX_DEVICES} device names (\"0\", \"cpu1\")")
        return cls(**copy.deepcopy(data))


_PERSISTED = tuple(f.name for f in fields(Job) if f.name != "progress")


class WorkerLost(RuntimeError):
    """The worker process running a job died (killed, crashed, out of memory): the queue runs the
    job again, counting it in ``Job.restarts`` as a server restart does (:mod:`wan.app.jobqueue`)."""


def placement_text(gpus) -> str:
    """Where a job runs, in words: ``GPU 2``, ``GPUs 0,1``, ``CPU 1`` (the second CPU worker),
    ``CPU ×2`` (a group of two CPU processes); "" for none (the server process)."""
    names = [printable(g, 16) for g in gpus if isinstance(g, str)] if isinstance(gpus, list) else []
    if not names:
        return ""
    if all(n.startswith(CPU_PREFIX) for n in names):
        return f"CPU ×{len(names)}" if len(names) > 1 else f"CPU {names[0][len(CPU_PREFIX):]}"
    return f"GPU {names[0]}" if len(names) == 1 else f"GPUs {','.join(names)}"


def printable(value, limit: int | None = None) -> str:
    """``value`` as text that any page, log or JSON encoder takes: lone surrogates (which UTF-8
    cannot encode) become U+FFFD, control characters a space, and it is cut to ``limit``
    characters with an ellipsis. Text from a job is shown through this, never as it is."""
    text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        text = text[:max(limit - 1, 0)] + "…"
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ("\ufffd" if "\ud800" <= c <= "\udfff" else " ") for c in text)
    return text


def too_deep(value, limit: int = MAX_REQUEST_DEPTH) -> bool:
    """Whether lists and dicts nest more than ``limit`` levels (checked without recursion: a deep
    value must be refused, not crash the check, copy.deepcopy or json.dumps with RecursionError)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def expected_failure(e: BaseException) -> bool:
    """A refusal by one of our checks (``RequestError``, ``LoraError``, ``ConfigError``...: a
    ValueError subclass defined in this package), logged as one line; anything else (a plain
    ValueError, a RuntimeError) may be a bug and is logged with its traceback."""
    kind = type(e)
    if getattr(e, "plain_message", False):  # running out of memory: the message says what to change
        return True
    return isinstance(e, ValueError) and kind is not ValueError and kind.__module__.split(".")[0] == "wan"


def make_label(request: dict) -> str:
    """``"<task>: <first 60 characters of the prompt>"`` on one line (the model id when no task is set)."""
    kind = request.get("task") or request.get("model") or "job"
    kind = kind if isinstance(kind, str) else type(kind).__name__
    prompt = request.get("prompt") or ""
    prompt = " ".join((prompt if isinstance(prompt, str) else type(prompt).__name__)[:LABEL_PROMPT_CHARS * 20].split())
    return f"{kind[:LABEL_PROMPT_CHARS]}: {prompt[:LABEL_PROMPT_CHARS]}"


def error_message(e: BaseException) -> str:
    """The whole error for the UI, line breaks kept: a ValueError's own text (RequestError is one)
    or that of an error marked ``plain_message`` (running out of memory), else ``Type: text``.
    Trailing spaces and runs of blank lines are dropped, and it is cut at ``MAX_ERROR_CHARS`` with
    an ellipsis, so a queue file holding it stays small."""
    lines = str(e).replace("\r\n", "\n").replace("\r", "\n").expandtabs(4).split("\n")
    kept: list[str] = []
    for line in (line.rstrip() for line in lines):
        if line or (kept and kept[-1]):  # one blank line at most between two lines of text
            kept.append(line)
    text = "\n".join(kept).strip("\n")
    if not (isinstance(e, ValueError) or getattr(e, "plain_message", False)) or not text:
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 1] + "…"


def first_line(text, limit: int) -> str:
    """The first line of ``text``, printable and cut at ``limit`` characters; an ellipsis says that
    more follows (more of that line, or more lines)."""
    text = text if isinstance(text, str) else str(text)
    head, _, rest = text.strip().partition("\n")
    head = printable(head.rstrip(), limit)
    return head if not rest.strip() or head.endswith("…") else head + " …"


def printable_lines(value, limit: int | None = None) -> str:
    """Like :func:`printable`, but line breaks are kept (``\\r\\n`` and ``\\r`` become ``\\n``):
    for texts shown in a box of their own, such as a failed job's whole error."""
    text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        text = text[:max(limit - 1, 0)] + "…"
    return "\n".join(printable(line) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))


Runner = Callable[[Job, Callable[..., None], "CancelToken"], RunOutcome]
Listener = Callable[[str, Job], None]



def parse_queue_file(data) -> tuple[list[Job], list[tuple[str, str]]]:
    """The jobs of a queue file, and (job id or position, reason) for each job that cannot be
    read. Raises ValueError when the file as a whole is not one we wrote."""
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise ValueError("not a job queue file (a JSON object with a 'jobs' list was expected)")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FILE_VERSION:
        raise ValueError(f"version {printable(repr(version), 40)}; this Wan Studio reads versions 1 to {FILE_VERSION}")
    jobs: list[Job] = []
    bad: list[tuple[str, str]] = []
    seen: set[str] = set()
    for n, item in enumerate(data["jobs"], start=1):
        key = item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), str) else f"#{n}"
        try:
            job = Job.from_dict(item)
        except (ValueError, TypeError, RecursionError) as e:
            bad.append((key, str(e)))
            continue
        if job.id in seen:
            bad.append((key, "the same job id appears earlier in the file"))
            continue
        seen.add(job.id)
        jobs.append(job)
    return jobs, bad


KEPT_FILES_PER_SESSION = 200  # as many as the gallery shows
KEPT_SESSIONS = 100


def parse_kept_outputs(value) -> dict[str, list[str]]:
    """The ``kept_outputs`` of a queue file (session -> output files of its done jobs that left the
    list: removed, cleared or past the history's length), as far as it can be read: anything of the
    wrong type is left out (these are only gallery entries), and it is bounded like the queue keeps it."""
    if not isinstance(value, dict):
        return {}
    kept: dict[str, list[str]] = {}
    for session, files in list(value.items())[-KEPT_SESSIONS:]:
        if isinstance(session, str) and len(session) <= MAX_SESSION_CHARS and isinstance(files, list):
            good = [f for f in files if isinstance(f, str)][:KEPT_FILES_PER_SESSION]
            if good:
                kept[session] = good
    return kept
