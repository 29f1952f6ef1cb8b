"""GPU worker processes of the web app: ``--gpus 0,1,2,3`` with ``--gpu_mode split | per_job``.

Without ``--gpus`` the server runs each generation in its own process (``AppState.engine``). With
it, generations run in worker processes that the server starts (``spawn``) and watches:

- *split*: one worker of N processes, a process group as torchrun starts one (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``; ``MASTER_PORT`` a fresh free port for each job,
  since each ``Engine.generate`` call creates and ends its group). Every rank gets the job and calls
  ``Engine.generate(request, parallel=...)`` with the layout of :func:`split_layout` (Ulysses over
  all N; CFG parallel on two groups of N/2 when N does not divide the model's heads); rank 0 sends
  the progress and the outcome back. The queue runs one job at a time.
- *per_job*: one single-process worker per GPU, and one queue thread per worker: N jobs at once.

The processes of a worker see its GPUs, in order, as ``CUDA_VISIBLE_DEVICES`` (indices as this
server sees them), and rank r runs on ``cuda:r``. CPU workers (``--gpus cpu:N``, for tests and
machines without CUDA) run on the CPU with one torch thread each, devices named ``cpu0``, ``cpu1``.

Supervision: a process that dies while its job runs (killed, crashed, out of memory) takes its
whole worker down: every process of it is killed, the job raises :class:`~wan.app.jobs.WorkerLost`
and the queue runs it again on a fresh worker, counted in ``Job.restarts`` and failed after
``max_restarts`` as after a server restart (:mod:`wan.app.jobqueue`). A worker is started when a
job needs it and is not up (the first job, or the one after a death). A worker that cannot start
fails its job with the reason, never a hung queue. A rank that fails while the others wait in a
collective gives them ``GRACE_S`` to end, then the worker is restarted. Workers stop with the
server (:meth:`WorkerPool.close`); they are daemonic processes that also end by themselves when
the server process is gone (a watch on their parent), so a killed server leaves none behind.

Only generation jobs go to the workers: downloads and training runs stay in the server process (a
download needs no GPU; a training run is its own loop with its own models, ``wan.app.train_jobs``).
Before a training run the idle workers are stopped, so their GPU memory is free for it.

Messages on each rank's pipe, server -> worker: ``("job", request_dict, files, config, port)`` and
``("stop",)``; worker -> server: ``("ready",)`` or ``("failed", error, traceback)`` at the start,
``("step", fields, preview)`` (rank 0) while a job runs, then one ``("done", files, notices)``,
``("cancelled",)`` or ``("error", text, expected, traceback)`` per job. A cancel reaches rank 0
through a flag in shared memory (it is inside ``generate``, not reading its pipe; a lock-free byte,
so a killed server leaves no semaphore behind); the engine gives it to the other ranks at the next
step (``SharedCancel``).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_any
from typing import Any

from wan.app.jobs import CPU_PREFIX, RunOutcome, WorkerLost, error_message, expected_failure, placement_text

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # torch, the engine and a CUDA context on a loaded machine
STOP_TIMEOUT_S = 5.0     # a worker asked to stop is killed after this
GRACE_S = 30.0           # the others of a rank that failed mid-job, before the worker is restarted
POLL_S = 0.2             # how often a waiting server thread looks at the job's cancel token
PREVIEW_INTERVAL_S = 1.0


class WorkerError(ValueError):
    """A job that failed in a worker process, in the words the server process would have used
    (a refused request is one line); or a worker that could not start, with the reason."""


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker process builds its engine from; it travels to the process, so it must pickle.

    ``engine_factory(setup, device) -> Engine`` (a module-level function; default
    :func:`default_engine`) lets tests hand the workers an engine of their own."""

    checkpoint_dir: str
    lora_dir: str | None
    limits: Any = None  # wan.engine.request_checks.Limits: the server's request limits
    verbose: bool = False
    engine_factory: Callable[..., Any] | None = None


def default_engine(setup: WorkerSetup, device: str):
    """The engine of a worker process, as the server's own would be (LoRAs by name only)."""
    from wan.engine import Engine
    engine = Engine(checkpoint_dir=setup.checkpoint_dir, lora_dir=setup.lora_dir, limits=setup.limits,
                    device=device)
    engine.lora_names_only = True
    return engine


# ---------------------------------------------------------------------------------------------
# Checks and layout (in the server process)


def is_cpu(devices) -> bool:
    return bool(devices) and all(str(d).startswith(CPU_PREFIX) for d in devices)


def check_devices(devices: tuple[str, ...], count: int | None = None) -> None:
    """Refuses GPU indices this machine lacks, at the server's start (``count``: its CUDA devices,
    asked of torch when None). CPU workers need nothing.

    Raises:
        SettingsError: naming ``--gpus``, its value and the GPUs there are.
    """
    if not devices or is_cpu(devices):
        return
    from wan.app.settings import SettingsError, gpus_text
    if count is None:
        import torch
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    value = gpus_text(devices)
    if count == 0:
        raise SettingsError.bad("flag", "gpus", value, "cpu:N for N CPU worker processes, or no --gpus "
                                                       "(this machine has no CUDA device)")
    missing = [d for d in devices if int(d) >= count]
    if missing:
        raise SettingsError.bad("flag", "gpus", value, f"GPU indices this machine has: "
                                f"{', '.join(map(str, range(count)))} ({count} CUDA device(s); "
                                f"GPU {', '.join(missing)} is not one of them)")


def split_layout(world: int, num_heads: int, guidances=(), value: str = ""):
    """The parallel layout of one job on the ``world`` processes of a split worker: Ulysses over
    all of them when they divide the model's attention heads, else the prompt and negative-prompt
    passes on two groups (CFG parallel) each splitting over ``world / 2``, when that divides the
    heads and the job has a guidance other than 1.

    Raises:
        ParallelConfigError: neither fits (naming ``--gpus``), before the job reaches a worker.
    """
    from wan.parallel import ParallelConfig, ParallelConfigError
    if world == 1:
        return ParallelConfig()
    if num_heads % world == 0:
        return ParallelConfig(ulysses_size=world)
    guided = any(g is not None and float(g) != 1.0 for g in guidances)
    if world % 2 == 0 and guided and num_heads % (world // 2) == 0:
        return ParallelConfig(ulysses_size=world // 2, cfg_parallel=True)
    raise ParallelConfigError(
        "gpus", value or world, f"a number of GPUs that divides the model's {num_heads} attention heads (twice "
        "that with a guidance other than 1), or --gpu_mode per_job",
        f"split mode cannot share this model's {num_heads} attention heads among {world} processes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_environment(devices: tuple[str, ...], rank: int, env=None) -> dict[str, str]:
    """The environment a rank starts with: torchrun's variables (``MASTER_PORT`` comes with each
    job) and the GPUs it sees. A GPU index is the server's own numbering, so under a
    ``CUDA_VISIBLE_DEVICES`` of the server's it names the entry at that index."""
    env = os.environ if env is None else env
    out = {"RANK": str(rank), "WORLD_SIZE": str(len(devices)), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1"}
    if is_cpu(devices):
        out.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        return out
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    out["CUDA_VISIBLE_DEVICES"] = ",".join(visible[int(d)] if int(d) < len(visible) else d for d in devices)
    return out


def _exit_story(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# ---------------------------------------------------------------------------------------------
# One worker: its processes, seen from the server


class Worker:
    """The processes of one device list: one (per_job), or the ranks of a split group. Started on
    demand; used by one queue thread at a time (:meth:`WorkerPool.lease`)."""

    def __init__(self, devices: tuple[str, ...], setup: WorkerSetup, ctx=None):
        self.devices = tuple(devices)
        self.setup = setup
        self._ctx = ctx or mp.get_context("spawn")
        self._lock = threading.Lock()  # the process lists, between the runner and a stop
        self._procs: list = []
        self._conns: list = []
        self._cancel = None  # rank 0's cancel flag (a shared byte: 1 = cancel)
        self.closing = False  # the server is stopping: a death is not a crash

    @property
    def label(self) -> str:
        return placement_text(list(self.devices))

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs]

    def alive(self) -> bool:
        with self._lock:
            return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def start(self) -> None:
        """Starts the processes unless all are up, and waits until each has built its engine.

        Raises:
            WorkerError: a process failed or ended before it was ready, or took over
                ``START_TIMEOUT_S``; every process of the worker is stopped then.
        """
        if self.alive():
            return
        if self.closing:
            raise WorkerLost("the server is stopping")
        self.kill()  # what is left of a worker that lost a process
        log.info("starting the worker on %s (%d process(es))", self.label, len(self.devices))
        with self._lock:
            self._cancel = self._ctx.RawValue("b", 0)
            for rank in range(len(self.devices)):
                mine, theirs = self._ctx.Pipe()
                proc = self._ctx.Process(target=worker_main, name=f"wan-worker-{'-'.join(self.devices)}-rank{rank}",
                                         args=(theirs, self._cancel, rank, self.devices,
                                               child_environment(self.devices, rank), pickle.dumps(self.setup)),
                                         daemon=True)
                proc.start()
                theirs.close()  # the worker's end lives in the worker: a dead worker reads as EOF here
                self._procs.append(proc)
                self._conns.append(mine)
            procs, conns = list(self._procs), list(self._conns)
        try:
            self._wait_ready(procs, conns)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, procs: list, conns: list) -> None:
        waiting = set(range(len(procs)))
        deadline = time.monotonic() + START_TIMEOUT_S
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"the worker on {self.label} did not start within {START_TIMEOUT_S:.0f} s")
            wait_any([conns[r] for r in waiting] + [procs[r].sentinel for r in waiting], min(left, 5.0))
            for rank in sorted(waiting):
                message = _poll(conns[rank])
                if message is None and procs[rank].is_alive():
                    continue
                if message is None or message == "eof":
                    procs[rank].join(1)
                    raise WorkerError(f"the worker on {self.label} could not start: its process (rank {rank}) "
                                      f"{_exit_story(procs[rank].exitcode)} before it was ready; see the server log")
                if message[0] == "failed":
                    log.error("the worker on %s could not start (rank %d):\n%s", self.label, rank, message[2])
                    raise WorkerError(f"the worker on {self.label} could not start: {message[1]}")
                waiting.discard(rank)
        log.info("the worker on %s is ready (pids %s)", self.label, ", ".join(str(p.pid) for p in procs))

    def run(self, request: dict, files: dict | None, config, progress: Callable[..., None], cancel) -> RunOutcome:
        """Runs one job (``GenerationRequest.to_dict()``) on every process, starting them first if
        needed. ``progress(info, preview)`` gets rank 0's steps (a ``StepInfo`` and latent preview
        pixels or None).

        Raises:
            WorkerLost: a process died while the job ran (the worker is stopped: the next job starts it).
            WorkerError: the job failed (rank 0's error) or the worker could not start.
            Cancelled: ``cancel`` was set and the job stopped.
        """
        from wan.engine.loop import Cancelled
        self.start()
        with self._lock:
            procs, conns, flag = list(self._procs), list(self._conns), self._cancel
        try:
            ends = self._run_on(procs, conns, flag, (request, files, config, free_port()), progress, cancel)
        except BaseException:
            self.kill()  # the job may still be in flight on it (a death, or a bug of ours): start afresh
            raise
        return self._outcome(ends, Cancelled)

    def _run_on(self, procs: list, conns: list, flag, job: tuple, progress, cancel) -> dict[int, tuple]:
        """Sends the job to every rank and collects their ends (rank -> end message), passing
        rank 0's steps to ``progress`` and a cancel to rank 0's flag."""
        from wan.engine.loop import StepInfo
        flag.value = 0
        for rank, conn in enumerate(conns):
            try:
                conn.send(("job", *job))
            except OSError:
                self._lost(procs, rank)
        ends: dict[int, tuple] = {}
        first_end = None
        while len(ends) < len(procs):
            if cancel is not None and cancel.cancelled and not flag.value:
                flag.value = 1
            pending = [r for r in range(len(procs)) if r not in ends]
            wait_any([conns[r] for r in pending] + [procs[r].sentinel for r in pending], POLL_S)
            for rank in pending:
                while (message := _poll(conns[rank])) is not None and message != "eof":
                    if message[0] == "step":
                        progress(StepInfo(**message[1]), message[2])
                    else:
                        ends[rank] = message
                        first_end = first_end or time.monotonic()
                        break
                if rank not in ends and (message == "eof" or not procs[rank].is_alive()):
                    self._lost(procs, rank)
            failed = [m for m in ends.values() if m[0] != "done"]
            if failed and len(ends) < len(procs) and time.monotonic() - first_end > GRACE_S:
                log.warning("the worker on %s: ranks %s did not end within %.0f s of a failed rank; restarting it",
                            self.label, sorted(set(range(len(procs))) - set(ends)), GRACE_S)
                self.kill()
                ends.setdefault(0, failed[0])
                break
        return ends

    def _outcome(self, ends: dict[int, tuple], cancelled: type) -> RunOutcome:
        """Rank 0's end as the job's outcome (another rank's error when rank 0 has none to give)."""
        for rank, end in sorted(ends.items()):
            if rank and end[0] == "error":
                log.warning("the worker on %s, rank %d: %s", self.label, rank, end[1])
        main = ends[0]
        if main[0] == "done":
            return RunOutcome([str(f) for f in main[1]], [str(n) for n in main[2]])
        if main[0] == "cancelled":
            raise cancelled("cancelled")
        if not main[2]:  # not one of our refusals: the worker's traceback, as the server would log it
            log.error("a job failed in the worker on %s:\n%s", self.label, main[3])
        raise WorkerError(main[1])

    def _lost(self, procs: list, rank: int):
        """A process died with a job on it: the whole worker goes, the job is run again."""
        procs[rank].join(1)
        story = _exit_story(procs[rank].exitcode)
        self.kill()
        if self.closing:
            raise WorkerLost(f"the server stopped while the job ran on {self.label}")
        raise WorkerLost(f"the worker process on {self.label} (rank {rank}, pid {procs[rank].pid}) {story} "
                         "while it ran the job")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Asks the processes to end (they do after their current job) and kills what is left after
        ``timeout`` seconds."""
        with self._lock:
            conns, procs = list(self._conns), list(self._procs)
        for conn in conns:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """Kills every process of the worker (SIGKILL) and forgets them."""
        with self._lock:
            procs, conns = self._procs, self._conns
            self._procs, self._conns = [], []
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(5)
        for conn in conns:
            conn.close()


def _poll(conn):
    """The next message on ``conn`` if one is there, None if none, "eof" once its worker is gone."""
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):
        return "eof"


# ---------------------------------------------------------------------------------------------
# The workers of a server


class WorkerPool:
    """The workers of ``--gpus`` in ``--gpu_mode`` (see the module docstring). Nothing starts until
    a job needs it (or :meth:`warm_up`)."""

    def __init__(self, devices: tuple[str, ...], mode: str, setup: WorkerSetup, ctx=None):
        if mode not in ("split", "per_job"):
            raise ValueError(f"gpu_mode: {mode!r} is not allowed; split or per_job")
        self.devices, self.mode, self.setup = tuple(devices), mode, setup
        ctx = ctx or mp.get_context("spawn")
        groups = [self.devices] if mode == "split" else [(d,) for d in self.devices]
        self.workers = [Worker(g, setup, ctx) for g in groups]
        self._free = list(self.workers)
        self._changed = threading.Condition()
        self._closed = False

    @classmethod
    def from_settings(cls, settings, engine_factory: Callable[..., Any] | None = None) -> WorkerPool:
        from wan.app.security import limits_of
        from wan.app.settings import parse_gpus
        setup = WorkerSetup(checkpoint_dir=str(settings.checkpoint_dir), lora_dir=settings.lora_dir,
                            limits=limits_of(settings), verbose=bool(settings.verbose), engine_factory=engine_factory)
        return cls(parse_gpus(settings.gpus), settings.gpu_mode, setup)

    @property
    def slots(self) -> int:
        """How many jobs can run at once (the queue's worker threads)."""
        return len(self.workers)

    @contextmanager
    def lease(self) -> Iterator[Worker]:
        """A free worker for one job (one queue thread per worker: there always is one)."""
        with self._changed:
            self._changed.wait_for(lambda: self._free or self._closed)
            if self._closed:
                raise WorkerLost("the server is stopping")
            worker = self._free.pop(0)
        try:
            yield worker
        finally:
            with self._changed:
                self._free.append(worker)
                self._changed.notify_all()

    def run(self, request, files: dict | None, progress: Callable[..., None], cancel,
            placed: Callable[[list[str]], None] = lambda gpus: None) -> RunOutcome:
        """Runs ``request`` (a prepared ``GenerationRequest``) on a free worker; ``placed(devices)``
        is told where, before the worker starts. Raises as :meth:`Worker.run`, or the request's
        own error (checked here first when a split worker must pick its layout)."""
        config = None
        if self.mode == "split" and len(self.devices) > 1:
            from wan.app.settings import gpus_text
            from wan.engine.request import resolve_request
            from wan.engine.phases import phase_guidances
            req, spec = resolve_request(request, limits=self.setup.limits)
            config = split_layout(len(self.devices), spec.arch.num_heads, phase_guidances(req, spec.is_two_expert),
                                  gpus_text(self.devices))
        with self.lease() as worker:
            placed(list(worker.devices))
            return worker.run(request.to_dict(), files, config, progress, cancel)

    def warm_up(self) -> None:
        """Starts the free workers in the background, so the first job does not wait for them
        (a worker that cannot start says why in the log, and again to the job that needs it)."""
        def start(worker: Worker) -> None:
            try:
                with self._holding(worker):
                    worker.start()
            except LookupError:
                pass  # a job took it first: it starts it itself
            except Exception as e:  # noqa: BLE001 - logged; the job that needs the worker is told
                log.warning("the worker on %s could not start: %s", worker.label, e)
        for worker in list(self.workers):
            threading.Thread(target=start, args=(worker,), name="wan-worker-warm-up", daemon=True).start()

    @contextmanager
    def _holding(self, worker: Worker) -> Iterator[None]:
        """Holds ``worker`` out of the free list (LookupError when it is not free)."""
        with self._changed:
            if self._closed or worker not in self._free:
                raise LookupError(worker.label)
            self._free.remove(worker)
        try:
            yield
        finally:
            with self._changed:
                self._free.append(worker)
                self._changed.notify_all()

    def release_idle(self) -> None:
        """Stops the workers that run no job, giving back their GPU memory (before a training run
        in the server process); they start again with the next job that needs them."""
        for worker in list(self.workers):
            try:
                with self._holding(worker):
                    if worker.alive():
                        log.info("stopping the idle worker on %s to free its memory", worker.label)
                    worker.stop()
            except LookupError:
                continue

    def close(self) -> None:
        """Stops every worker (a running job's is killed: the queue runs that job again at the next
        start). No worker starts after this."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        for worker in self.workers:
            worker.closing = True
        for worker in self.workers:
            worker.stop(timeout=1.0)


# ---------------------------------------------------------------------------------------------
# The worker process


class _FlagCancel:
    """Rank 0's cancel token (``CancelToken``'s interface): the server sets the shared flag."""

    def __init__(self, flag):
        self._flag = flag

    def cancel(self) -> None:
        self._flag.value = 1

    @property
    def cancelled(self) -> bool:
        return bool(self._flag.value)


def _exit_with_parent() -> None:
    """Ends this process when the server process is gone (killed, crashed): its jobs have no one
    to report to, and its GPU memory is wanted by the next server."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(3)
    threading.Thread(target=watch, name="wan-worker-parent-watch", daemon=True).start()


def worker_main(conn, cancel_flag, rank: int, devices: tuple[str, ...], env: dict[str, str],
                setup: bytes) -> None:
    """A worker process: builds its engine, says ready, then runs the jobs its pipe brings.
    ``setup`` is a pickled :class:`WorkerSetup`, read once the environment is set: its engine
    factory and limits import torch, which must not meet CUDA before ``CUDA_VISIBLE_DEVICES``."""
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is for the server to handle
    _exit_with_parent()
    try:
        setup = pickle.loads(setup)
        logging.basicConfig(level=logging.DEBUG if setup.verbose else logging.INFO,
                            format=f"%(asctime)s %(levelname)s worker {'-'.join(devices)} rank {rank}: %(message)s")
        import torch
        if is_cpu(devices):
            torch.set_num_threads(1)
            device = "cpu"
        else:
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        engine = (setup.engine_factory or default_engine)(setup, device)
    except BaseException as e:  # noqa: BLE001 - told to the server, which fails the job with it
        conn.send(("failed", error_message(e), traceback.format_exc()))
        return
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if message[0] != "job":
            return
        conn.send(run_job(engine, message, rank, cancel_flag, conn))


def run_job(engine, message: tuple, rank: int, cancel_flag, conn) -> tuple:
    """One job on this rank; returns its end message."""
    from wan.engine.loop import Cancelled
    from wan.engine.request import GenerationRequest
    _, request, files, config, port = message
    os.environ["MASTER_PORT"] = str(port)  # each generate call makes and ends its process group
    main = rank == 0
    last = [0.0]

    def progress(info) -> None:
        preview = None
        # at most one preview a second: each one copies the latent off the device
        if info.latent is not None and time.monotonic() - last[0] >= PREVIEW_INTERVAL_S:
            last[0] = time.monotonic()
            try:
                from wan.app.preview import latent_preview
                preview = latent_preview(info.latent[0] if info.latent.dim() == 5 else info.latent)
            except Exception:  # noqa: BLE001 - a preview is a nicety: never fail a job over it
                log.warning("latent preview failed; no more previews for this job", exc_info=True)
                last[0] = float("inf")
        fields = dict(step=info.step, total=info.total, timestep=float(info.timestep), expert=info.expert,
                      guidance=float(info.guidance), elapsed=info.elapsed, eta=info.eta, passes=tuple(info.passes),
                      window=int(getattr(info, "window", 1)), windows=int(getattr(info, "windows", 1)),
                      phase=int(getattr(info, "phase", 1)))
        conn.send(("step", fields, preview))
    try:
        result = engine.generate(GenerationRequest.from_dict(request), progress=progress if main else None,
                                 cancel=_FlagCancel(cancel_flag) if main else None,
                                 **({"files": files} if files else {}), parallel=config)
        return ("done", [str(f) for f in result.files], [str(n) for n in result.notices])
    except Cancelled:
        return ("cancelled",)
    except BaseException as e:  # noqa: BLE001 - the job's error, for the server to report
        return ("error", error_message(e), expected_failure(e), traceback.format_exc())
