"""The job queue of the web app: every browser session adds to it, worker threads run the jobs.

Several sessions share one GPU, so jobs run one at a time in queue order: one worker thread. With
several GPU workers (``--gpus 0,1 --gpu_mode per_job``, :mod:`wan.app.gpu_workers`) the queue has
one thread per worker (``workers``), each taking the next job in queue order. The queue keeps:

- the running jobs (at most ``workers``), each with its cancel token and live progress;
- the queued jobs, in the order they will run (the UI may reorder them);
- the finished jobs (done, failed, cancelled), newest first, the last ``max_history`` of them.

What a job does is not the queue's business: a *runner* is injected,
``runner(job, progress, cancel) -> RunOutcome``. The app's runner calls
:meth:`wan.engine.engine.Engine.generate`; tests pass fake runners. The runner may return a
:class:`RunOutcome` or anything with ``files`` and ``notices`` (a ``GenerationResult`` works).

Thread safety: one lock guards the state; every public method returns copies, never the live
objects, so UI threads may keep and read what they get. Listeners and the disk write run outside
that lock, so a slow disk never stalls a page refresh.

Persistence: on every add, remove, move and status change the whole queue is written to ``path``
as JSON, atomically (temporary file in the same folder, fsync, ``os.replace``). Progress is kept
in memory only. On construction an existing file is loaded: a job that was running when the
server died is queued again at the head (``restarts`` counted; after ``max_restarts`` it is
failed instead, so a job that kills the server cannot do it forever). A job whose runner raises
:class:`~wan.app.jobs.WorkerLost` (its worker process died) goes back to the head under the same
rule, without a server restart (``placed`` records which worker runs a job); finished jobs stay in the
history and never run again. A file that cannot be read, or that a newer version wrote, is
renamed aside to ``<name>.corrupt-<timestamp>`` with a logged warning and the queue starts
empty: the server always starts, and the old file is kept for a person to look at. A readable
file with some bad jobs in it (a wrong field, a request nested too deeply, an id used twice) is
renamed aside the same way, but only those jobs are dropped: the others load and are saved
again at once. Temporary files of saves cut short by a crash (``.<name>.*.tmp``) are removed.

Sessions: on a shared server the app passes ``owner`` to :meth:`move`, :meth:`remove` and
:meth:`abort`, so a session acts only on its own jobs (checked under the lock), and gives
``max_per_session`` so one session cannot fill the whole queue.

Logging: a job refused by our own checks (a ``ValueError`` subclass of this package:
``RequestError``, ``LoraError``, ...) is logged as one line; anything else with its traceback.

Outputs: the queue never writes, rewrites or deletes output files; removing a finished job from
the history leaves its files on disk, and the queue remembers them for the job's session
(:meth:`kept_outputs`, saved in the queue file): a video stays in its session's gallery after its
job is removed, cleared or pushed out of the history. A completed output is never overwritten by a later job
either: the engine's writer claims each final name exclusively (``os.link`` / ``O_EXCL`` in
``wan/engine/media_out.py`` ``_claim``) and picks a numbered name when one is taken.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from wan.app.jobs import (FILE_VERSION, FINISHED, KEPT_FILES_PER_SESSION, KEPT_SESSIONS, MAX_DEVICES,
                          MAX_REQUEST_DEPTH, MAX_SESSION_CHARS, Job, JobProgress, Listener, RunOutcome, Runner,
                          WorkerLost, parse_kept_outputs, parse_queue_file, too_deep, error_message,
                          expected_failure, make_label, placement_text, printable)
from wan.fileio import write_text_atomic as _write_atomic

if TYPE_CHECKING:  # the engine (and torch) load in the worker, when the first job runs
    from wan.engine.loop import CancelToken, StepInfo

log = logging.getLogger(__name__)

class JobQueue:
    """A queue of generation jobs run in order by ``workers`` threads (see the module docstring).

    Args:
        path: JSON file the queue lives in (None: memory only).
        runner: ``runner(job, progress, cancel)`` runs one job and returns a :class:`RunOutcome`.
            ``progress(info: StepInfo, preview: str | None = None)`` records a finished step;
            ``cancel`` is the job's token (raise :class:`~wan.engine.loop.Cancelled` when it is set,
            as ``Engine.generate`` does). The job given is a copy.
        max_queued: how many jobs may wait at once; ``add`` refuses more.
        max_history: how many finished jobs are kept (newest first).
        max_restarts: a job found running at load, or whose worker process died, that was already
            restarted this often is failed.
        max_per_session: how many jobs one session may have waiting at once (None: no limit of its own).
        interrupted: ``interrupted(job)`` for a job found running at load: None queues it again (the
            default for every job), a text fails it with that text as its error instead (a training
            run is offered for resumption from its saved state rather than started over).
        workers: how many jobs run at once, each on a worker thread of its own (1: one at a time).
        exclusive: ``exclusive(request)`` true for a job that must run alone (a training run needs
            the whole GPU): with several workers it starts only when no other job runs, and no job
            starts beside it. The queue's order holds: the jobs behind it wait for it.
    """

    def __init__(self, path: str | os.PathLike | None, runner: Runner, max_queued: int = 100,
                 max_history: int = 200, max_restarts: int = 3, max_per_session: int | None = None,
                 interrupted: Callable[[Job], str | None] | None = None, workers: int = 1,
                 exclusive: Callable[[dict], bool] | None = None):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: {workers!r} is not allowed; a whole number >= 1")
        self.path = Path(path) if path is not None else None
        self._interrupted = interrupted
        self._exclusive = exclusive
        self._runner = runner
        self.max_queued = max_queued
        self.max_per_session = max_per_session
        self.max_history = max_history
        self.max_restarts = max_restarts
        self.workers = workers
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # workers wait for jobs, wait_idle for the end
        self._queued: list[Job] = []
        self._running: list[Job] = []  # in the order they started
        self._tokens: dict[str, CancelToken] = {}  # running job id -> its cancel token
        self._history: list[Job] = []  # newest first
        self._kept: dict[str, list[str]] = {}  # session -> files of its done jobs no longer listed, newest first
        self._listeners: list[Listener] = []
        self._threads: list[threading.Thread] = []  # the worker threads that loop
        self._stopping = False
        self._busy = 0  # jobs held by workers, from taking one until its end is saved and told
        self._write_lock = threading.Lock()
        self._seq = 0       # snapshot number, taken under _lock
        self._written = 0   # last snapshot number on disk, under _write_lock
        if self.path is not None:
            self._remove_partial_saves()
        if self.path is not None and self.path.exists():
            self._load()

    # -- reading ---------------------------------------------------------------------------------

    def jobs(self, session: str | None = None, include_finished: bool = True) -> list[Job]:
        """Copies in queue order: the running job, the queued ones in order, then finished newest first."""
        with self._lock:
            chosen = self._ordered(include_finished)
            return [copy.deepcopy(j) for j in chosen if session is None or j.session == session]

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._find(job_id)
            return copy.deepcopy(job) if job is not None else None

    def running(self) -> Job | None:
        """The running job that started first (None when none runs); see :meth:`running_jobs`."""
        with self._lock:
            return copy.deepcopy(self._running[0]) if self._running else None

    def running_jobs(self) -> list[Job]:
        """Copies of every running job, in the order they started."""
        with self._lock:
            return copy.deepcopy(self._running)

    def kept_outputs(self, session: str) -> list[str]:
        """Output files of ``session``'s done jobs that are no longer listed (removed, cleared, or
        past ``max_history``), newest first: the gallery still shows them."""
        with self._lock:
            return list(self._kept.get(session, ()))

    # -- changing --------------------------------------------------------------------------------

    def add(self, request: dict, session: str, label: str | None = None) -> Job:
        """Queues ``request`` (a ``GenerationRequest.to_dict()``) for ``session``; returns the job.

        Raises:
            ValueError: the queue already holds ``max_queued`` waiting jobs (or the session its
                ``max_per_session``), the session is not a short string, or the request is not a
                JSON-ready dict.
        """
        if not isinstance(request, dict):
            raise ValueError(f"request: {type(request).__name__} is not allowed; a dict (GenerationRequest.to_dict())")
        if not isinstance(session, str) or len(session) > MAX_SESSION_CHARS:
            raise ValueError(f"session: {printable(repr(session), 40)} is not allowed; "
                             f"a string of at most {MAX_SESSION_CHARS} characters")
        if too_deep(request):
            raise ValueError(f"request: nested more than {MAX_REQUEST_DEPTH} levels deep; "
                             "pass GenerationRequest.to_dict()")
        try:
            request = json.loads(json.dumps(request))  # our own copy, and proof that it can be saved
        except (TypeError, ValueError, RecursionError) as e:
            raise ValueError(f"request: cannot be saved as JSON ({e}); pass GenerationRequest.to_dict()") from None
        with self._lock:
            if len(self._queued) >= self.max_queued:
                raise ValueError(f"the queue is full: {len(self._queued)} jobs are waiting (limit {self.max_queued}); "
                                 "wait for some to finish or remove some")
            mine = sum(1 for j in self._queued if j.session == session)
            if self.max_per_session is not None and mine >= self.max_per_session:
                raise ValueError(f"you have {mine} jobs waiting, the most one session may have on this server "
                                 f"(--max_queue_per_session {self.max_per_session}); wait for some to finish "
                                 "or remove some")
            job = Job(id=self._new_id(), session=str(session), request=request,
                      label=label if label is not None else make_label(request), created=time.time())
            self._queued.append(job)
            pending = self._change("added", job)
        self._publish(pending)
        return copy.deepcopy(job)

    def move(self, job_id: str, offset: int, owner: str | None = None) -> None:
        """Moves a queued job ``offset`` places (-1: one up, +1: one down), clamped at the ends.
        With ``owner``, only a job of that session (else ValueError naming the job)."""
        with self._lock:
            job = self._queued_job(job_id, "moved")
            _check_owner(job, owner, "moved")
            i = self._queued.index(job)
            j = min(max(i + int(offset), 0), len(self._queued) - 1)
            self._queued.insert(j, self._queued.pop(i))
            pending = self._change("moved", job)
        self._publish(pending)

    def remove(self, job_id: str, owner: str | None = None) -> None:
        """Drops a queued job, or a finished one from the history (its output files stay on disk,
        and in its session's :meth:`kept_outputs`).

        Raises:
            ValueError: the job is running ("abort it first"), is not known, or is not ``owner``'s
                (when given).
        """
        with self._lock:
            job = self._find(job_id)
            if job is None:
                raise ValueError(f"job {printable(repr(job_id), 80)} is not in the queue or its history")
            _check_owner(job, owner, "removed")
            if self._is_running(job):
                raise ValueError(f"job {job_id} is running; abort it first")
            (self._queued if job.status == "queued" else self._history).remove(job)
            self._remember(job)
            pending = self._change("removed", job)
        self._publish(pending)

    def clear_finished(self, session: str | None = None) -> int:
        """Drops finished jobs (of one session, or all) from the history; returns how many. Their
        output files stay on disk and in their sessions' :meth:`kept_outputs`."""
        with self._lock:
            gone = [j for j in self._history if session is None or j.session == session]
            if not gone:
                return 0
            ids = {j.id for j in gone}
            self._history = [j for j in self._history if j.id not in ids]
            self._remember(*gone)
            pending = self._change("removed", *gone)
        self._publish(pending)
        return len(gone)

    def cancel(self, job_id: str, owner: str | None = None) -> None:
        """Cancels a job that is still waiting (it never runs). Unlike :meth:`abort`, never a
        running job, not even one that started just now: that raises ValueError, as does an unknown,
        finished or (with ``owner``) another session's job."""
        with self._lock:
            job = self._queued_job(job_id, "cancelled")
            _check_owner(job, owner, "cancelled")
            self._queued.remove(job)
            self._finish(job, "cancelled")
            pending = self._change("cancelled", job)
        self._publish(pending)

    def abort(self, job_id: str | None = None, owner: str | None = None) -> bool:
        """Cancels the running job (no id, or its id), or a queued job (it never runs).

        The running job stops at its next step boundary and becomes "cancelled" when the runner
        raises ``Cancelled``. Returns False when there was nothing to cancel (no running job, or
        the job already finished). Raises ValueError for an unknown id, or a job that is not
        ``owner``'s (when given).
        """
        with self._lock:
            job = (self._running[0] if self._running else None) if job_id is None else self._find(job_id)
            if job is None:
                if job_id is None:
                    return False
                raise ValueError(f"job {printable(repr(job_id), 80)} is not in the queue or its history")
            if job.status in FINISHED:
                return False
            _check_owner(job, owner, "aborted")
            if self._is_running(job):
                self._tokens[job.id].cancel()
                return True
            self._queued.remove(job)
            self._finish(job, "cancelled")
            pending = self._change("cancelled", job)
        self._publish(pending)
        return True

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        """Calls ``callback(event, job_copy)`` after every change (event: added, started, placed,
        finished, restarted, moved, removed, cancelled), outside the lock. Returns a function that
        unsubscribes."""
        with self._lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)
        return unsubscribe

    # -- the worker ------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the worker threads (daemons) that are not running. A stop that has not taken
        effect yet is called off."""
        with self._lock:
            self._stopping = False
            while len(self._threads) < self.workers:
                name = "wan-jobqueue-worker" + (f"-{len(self._threads)}" if self.workers > 1 else "")
                thread = threading.Thread(target=self._work, name=name, daemon=True)
                self._threads.append(thread)
                thread.start()

    def stop(self, timeout: float | None = None, cancel_running: bool = False) -> bool:
        """Stops the workers after their current jobs (or cancels those jobs too). True when they stopped."""
        with self._lock:
            self._stopping = True
            if cancel_running:
                for token in self._tokens.values():
                    token.cancel()
            threads = list(self._threads)
            self._changed.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    def placed(self, job_id: str, gpus: list[str]) -> None:
        """Records where a running job runs (the devices of its worker, see ``Job.gpus``); the
        queue panel shows it. Nothing happens for a job that is not running (any more)."""
        gpus = [str(g) for g in gpus][:MAX_DEVICES]
        with self._lock:
            job = self._find(job_id)
            if job is None or not self._is_running(job) or job.gpus == gpus:
                return
            job.gpus = gpus
            pending = self._change("placed", job)
        self._publish(pending)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Waits until nothing runs, nothing is queued and the last change is saved. False on timeout."""
        with self._lock:
            return self._changed.wait_for(lambda: self._busy == 0 and not self._queued, timeout)

    def wait_finished(self, job_id: str, timeout: float | None = None) -> Job | None:
        """Waits until the job has ended (done, failed or cancelled) or left the queue; returns a copy
        of it then (None once it is gone), or as it stands when ``timeout`` passes. Woken by each
        change of the queue, not by polling."""
        def ended() -> bool:
            job = self._find(job_id)
            return job is None or job.status not in ("queued", "running")
        with self._lock:
            self._changed.wait_for(ended, timeout)
            job = self._find(job_id)
            return copy.deepcopy(job) if job is not None else None

    def _work(self) -> None:
        # imported here, once there is a job, not at module level or at start: the web page is served
        # and the app stays light until the first job (torch takes a second and hundreds of MB)
        with self._lock:
            self._changed.wait_for(lambda: self._stopping or self._queued)
        try:
            from wan.engine.loop import Cancelled, CancelToken
        except Exception as e:  # a broken install fails each job with the reason, visible in the UI
            log.exception("job queue: the engine cannot be imported; every job will fail")
            broken = error_message(e)
            Cancelled, CancelToken = _NeverRaised, _BrokenToken
        else:
            broken = None
        while True:
            with self._lock:
                self._changed.wait_for(lambda: self._stopping or self._may_start())
                if self._stopping:
                    # under the lock, so start() knows at once that this worker no longer loops
                    self._threads = [t for t in self._threads if t is not threading.current_thread()]
                    self._changed.notify_all()
                    return
                job = self._queued.pop(0)
                self._busy += 1
                job.status, job.started, job.progress = "running", time.time(), None
                token = self._tokens[job.id] = CancelToken()
                self._running.append(job)
                given = copy.deepcopy(job)
                pending = self._change("started", job)
            try:
                if broken is not None:
                    self._publish(pending)
                else:
                    self._run_one(job, given, token, pending, Cancelled)
            except BaseException:  # a bug of ours must not end the worker: the next job still runs
                log.exception("job queue: the worker failed around job %s", job.id)
            finally:
                self._settle(job, broken)

    def _alone(self, job: Job) -> bool:
        """Whether ``job`` must run with no other job beside it (``exclusive``)."""
        if self._exclusive is None:
            return False
        try:
            return bool(self._exclusive(job.request))
        except Exception:  # noqa: BLE001 - a request it cannot read is an ordinary job
            return False

    def _may_start(self) -> bool:
        """Whether a free worker may take the first waiting job now (under the lock): not beside a
        job that runs alone, and a job that runs alone only once nothing else runs."""
        if not self._queued or any(self._alone(j) for j in self._running):
            return False
        return not (self._running and self._alone(self._queued[0]))

    def _settle(self, job: Job, broken: str | None) -> None:
        """Ends the worker's hold on ``job``, failing it if it was not finished properly."""
        pending = None
        with self._lock:
            if self._is_running(job):
                self._end_run(job)
                self._finish(job, "failed", broken or "the job queue failed around this job; see the server log")
                pending = self._change("finished", job)
        try:
            if pending is not None:
                self._publish(pending)
        except BaseException:
            log.exception("job queue: could not record the end of job %s", job.id)
        finally:
            with self._lock:
                self._busy -= 1
                self._changed.notify_all()

    def _run_one(self, job: Job, given: Job, token: CancelToken, started: tuple, cancelled: type) -> None:
        """Runs one taken job and records how it ended (without the lock)."""
        self._publish(started)
        status, outcome, error = self._run(given, job, token, cancelled)
        with self._lock:
            self._end_run(job)
            if status == "lost":
                pending = self._worker_lost(job, error)
                failed, restarts, where = job.status == "failed", job.restarts, placement_text(job.gpus)
            else:
                job.files, job.notices = outcome.files, outcome.notices
                self._finish(job, status, error)
                pending = self._change("finished", job)
        self._publish(pending)
        if status == "lost":  # logged outside the lock, with what the job was then
            where = f" ({where})" if where else ""
            if failed:
                log.error("job queue: job %s lost its worker again%s; failed after %d restarts", job.id, where,
                          restarts)
            else:
                log.warning("job queue: job %s lost its worker%s (%s); queued again first", job.id, where,
                            printable(error, 300))

    def _worker_lost(self, job: Job, reason: str) -> tuple:
        """A job whose worker process died: queued again at the head (``restarts`` counted), or
        failed once it was restarted ``max_restarts`` times, as after a server restart."""
        if job.restarts >= self.max_restarts:
            where = placement_text(job.gpus)
            self._finish(job, "failed", f"the worker process running this job{f' ({where})' if where else ''} died, "
                                        f"{job.restarts + 1} times; not restarted again (it may need more memory "
                                        f"than there is). Last time: {reason}")
            return self._change("finished", job)
        job.status, job.started, job.progress, job.restarts = "queued", None, None, job.restarts + 1
        self._queued.insert(0, job)
        return self._change("restarted", job)

    def _run(self, given: Job, job: Job, token: CancelToken, cancelled: type) -> tuple[str, RunOutcome, str | None]:
        """Calls the runner: (status, outcome, error message)."""
        def progress(info: StepInfo, preview: str | None = None) -> None:
            with self._lock:
                if job.status != "running":
                    return
                old = job.progress.preview if job.progress is not None else None
                job.progress = JobProgress(step=int(info.step), total=int(info.total), expert=str(info.expert),
                                           eta_s=float(info.eta), elapsed_s=float(info.elapsed),
                                           preview=str(preview) if preview is not None else old,
                                           window=int(getattr(info, "window", 1)),
                                           windows=int(getattr(info, "windows", 1)))
        try:
            result = self._runner(given, progress, token)
            outcome = RunOutcome(files=[str(f) for f in (getattr(result, "files", None) or [])],
                                 notices=[str(n) for n in (getattr(result, "notices", None) or [])])
            return "done", outcome, None
        except cancelled:
            return "cancelled", RunOutcome(), None
        except WorkerLost as e:  # its worker process died: run again (the worker is started afresh)
            return ("cancelled", RunOutcome(), None) if token.cancelled else ("lost", RunOutcome(), printable(e, 1000))
        except BaseException as e:  # whatever the runner raises fails its job, never the worker
            if expected_failure(e):  # a refusal with its reason: one line (the traceback with --verbose)
                log.warning("job queue: job %s (%s) failed: %s", job.id, printable(job.label, 80),
                            printable(error_message(e), 300))
                log.debug("job queue: where job %s failed", job.id, exc_info=True)
            else:
                log.exception("job queue: job %s (%s) failed", job.id, printable(job.label, 80))
            return "failed", RunOutcome(), error_message(e)

    # -- internals (called with the lock held unless said otherwise) -------------------------------

    def _ordered(self, include_finished: bool) -> list[Job]:
        return self._running + self._queued + (self._history if include_finished else [])

    def _is_running(self, job: Job) -> bool:
        return any(job is j for j in self._running)

    def _end_run(self, job: Job) -> None:
        """Takes ``job`` off the running list, with its cancel token."""
        self._running = [j for j in self._running if j is not job]
        self._tokens.pop(job.id, None)

    def _find(self, job_id: str) -> Job | None:
        return next((j for j in self._ordered(True) if j.id == job_id), None)

    def _queued_job(self, job_id: str, verb: str) -> Job:
        job = self._find(job_id)
        if job is None:
            raise ValueError(f"job {printable(repr(job_id), 80)} is not in the queue or its history")
        if job.status != "queued":
            raise ValueError(f"job {job_id} is {job.status}; only queued jobs can be {verb}")
        return job

    def _new_id(self) -> str:
        taken = {j.id for j in self._ordered(True)}
        while True:
            job_id = uuid.uuid4().hex[:12]
            if job_id not in taken:
                return job_id

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.status, job.finished, job.error = status, time.time(), error
        self._history.insert(0, job)
        self._remember(*self._history[self.max_history:])
        del self._history[self.max_history:]

    def _remember(self, *jobs: Job) -> None:
        """Keeps the output files of done jobs that leave the list, for their sessions' galleries
        (bounded: ``KEPT_FILES_PER_SESSION`` a session, the last ``KEPT_SESSIONS`` sessions)."""
        for job in jobs:
            if job.status != "done" or not job.files:
                continue
            files = [f for f in job.files if isinstance(f, str)]
            old = self._kept.pop(job.session, [])  # popped and put back: the session is now the newest
            self._kept[job.session] = (files + [f for f in old if f not in files])[:KEPT_FILES_PER_SESSION]
        while len(self._kept) > KEPT_SESSIONS:
            del self._kept[next(iter(self._kept))]

    def _change(self, event: str, *jobs: Job) -> tuple:
        """Takes what must happen outside the lock after a change: (snapshot no., JSON text, events)."""
        self._changed.notify_all()
        self._seq += 1
        text = self._serialise() if self.path is not None else None
        return self._seq, text, [(event, copy.deepcopy(j)) for j in jobs], list(self._listeners)

    def _serialise(self) -> str:
        """The file's text: one job per line, readable, and fast (json's C encoder skips ``indent``)."""
        head = json.dumps({"version": FILE_VERSION, "saved": time.time(), "kept_outputs": self._kept})[:-1]
        # ASCII escapes: a prompt with a lone surrogate (pasted from some editors) cannot be encoded
        # as UTF-8, and one such prompt must never stop the whole queue from being saved
        jobs = ",\n".join(json.dumps(j._record()) for j in self._ordered(True))
        return f'{head}, "jobs": [\n{jobs}\n]}}\n'

    def _publish(self, pending: tuple) -> None:
        """Writes the snapshot (unless a newer one is on disk already) and tells the listeners.
        Called without the lock."""
        seq, text, events, listeners = pending
        if text is not None:
            with self._write_lock:
                if seq > self._written:
                    try:
                        _write_atomic(self.path, text)
                        self._written = seq
                    except (OSError, ValueError):
                        log.exception("job queue: could not save %s; the queue goes on in memory", self.path)
        for event, job in events:
            for listener in listeners:
                try:
                    listener(event, job)
                except Exception:
                    log.exception("job queue: a listener failed on %s of job %s", event, job.id)

    # -- loading ---------------------------------------------------------------------------------

    def _remove_partial_saves(self) -> None:
        """Deletes the temporary files of saves that a crash cut short (``.queue.json.*.tmp``):
        nothing else writes them, and one save of a long queue can leave megabytes behind."""
        prefix = f".{self.path.name}."
        try:
            with os.scandir(self.path.parent) as entries:
                partial = [e.path for e in entries if e.name.startswith(prefix) and e.name.endswith(".tmp")
                           and e.is_file(follow_symlinks=False)]
        except OSError:
            return  # no folder yet: nothing to clean
        for name in partial:
            try:
                os.unlink(name)
            except OSError as e:
                log.warning("job queue: could not remove the partial save %s (%s)", name, e)
        if partial:
            log.info("job queue: removed %d partial save(s) of %s left by an earlier run", len(partial), self.path)

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            jobs, bad = parse_queue_file(data)
            self._kept = parse_kept_outputs(data.get("kept_outputs"))
        except (OSError, ValueError, TypeError, RecursionError) as e:  # RecursionError: JSON nested too deep
            self._set_aside(e)
            return
        if bad:
            reasons = "; ".join(f"job {printable(key, 40)}: {printable(reason, 200)}" for key, reason in bad[:5])
            more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
            self._set_aside(f"{len(bad)} job(s) could not be read and were left out, "
                            f"{len(jobs)} loaded: {reasons}{more}")
        restarted, stopped = [], []
        for job in jobs:
            job.progress = None
            reason = self._interrupted(job) if job.status == "running" and self._interrupted is not None else None
            if reason is not None:  # not run again by itself: the reason says what to do instead
                job.status, job.error = "failed", reason
                job.finished = job.finished or time.time()
                self._history.append(job)
                stopped.append(job)
            elif job.status == "running" and job.restarts >= self.max_restarts:
                job.status, job.error = "failed", (f"the server stopped while this job ran, {job.restarts + 1} times; "
                                                   "not restarted again (it may need more memory than there is)")
                job.finished = job.finished or time.time()
                self._history.append(job)
            elif job.status == "running":
                job.status, job.started, job.restarts = "queued", None, job.restarts + 1
                restarted.append(job)
            elif job.status == "queued":
                self._queued.append(job)
            else:
                self._history.append(job)
        self._queued[:0] = restarted
        self._history.sort(key=lambda j: j.finished or j.created, reverse=True)
        self._remember(*self._history[self.max_history:])
        del self._history[self.max_history:]
        if restarted:
            log.warning("job queue: %d job(s) were running when the server stopped; queued again first: %s",
                        len(restarted), ", ".join(j.id for j in restarted))
        if stopped:
            log.warning("job queue: %d job(s) were running when the server stopped and are not restarted: %s",
                        len(stopped), ", ".join(j.id for j in stopped))
        if restarted or stopped or (bad and jobs):  # saved at once: the file was renamed aside with the bad jobs
            with self._lock:
                pending = self._change("added", *restarted)
            self._publish(pending)

    def _set_aside(self, reason: Exception | str) -> None:
        """Renames an unreadable queue file out of the way (kept whole for a person to look at), so
        the server starts with an empty queue, or with the jobs that could be read (``reason`` a str)."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        try:
            os.replace(self.path, aside)
            log.warning("job queue: %s could not be read (%s); kept as %s, starting with %s",
                        self.path, printable(reason, 2000), aside,
                        "the jobs that could be read" if isinstance(reason, str) else "an empty queue")
        except OSError as e:
            log.error("job queue: %s could not be read (%s) nor renamed aside (%s); starting without its "
                      "bad jobs and NOT saving, so the file is left as it is", self.path, printable(reason, 2000), e)
            self.path = None


class _NeverRaised(Exception):
    """Stands for ``Cancelled`` when the engine cannot be imported."""


class _BrokenToken:
    """Stands for ``CancelToken`` when the engine cannot be imported (no job runs then)."""

    cancelled = False

    def cancel(self) -> None:
        pass


def _check_owner(job: Job, owner: str | None, verb: str) -> None:
    if owner is not None and job.session != owner:
        raise ValueError(f"job {job.id} is another session's job: on this shared server a session can "
                         f"only change its own jobs, so it was not {verb}")
