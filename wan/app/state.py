"""What every browser session of the studio shares: the settings, one job queue with its one
worker, and the engine (created on the first job, so the page serves before any model import).
With ``--gpus``, generations run in worker processes instead (:mod:`wan.app.gpu_workers`: one
process group that splits each job, or one worker per GPU with a queue thread each).

Each browser session keeps only its own id (in the browser's storage) and form values; jobs carry
the id of the session that queued them, so each session's gallery shows its own results while the
queue runs everyone's jobs in order. On a shared server (reachable from other machines: see
:func:`is_shared`) a session may only move, remove or abort its own jobs, sees no other session's
prompts, and may have at most ``max_queue_per_session`` jobs waiting; a local server keeps the
single-user behaviour (every job can be managed from any tab).

Uploads are pruned by age and total size (``uploads_max_age_days``, ``uploads_max_mb``) at start
and after jobs finish (at most every few minutes); an upload that a waiting or running job names
is never deleted.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

from wan.app.jobqueue import Job, JobQueue, RunOutcome
from wan.app.security import uploads_dir
from wan.app.settings import ServerSettings

log = logging.getLogger(__name__)
QUEUE_FILE = "queue.json"
PREVIEW_INTERVAL_S = 1.0
API_SESSION = "api"  # the session of the jobs queued through the API (/queue_job, /generate)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
PRUNE_INTERVAL_S = 300.0  # uploads are pruned after a job finishes at most this often
PARTIAL_UPLOAD_AGE_S = 3600.0  # a ".upload-*.tmp" older than this is a copy a crash cut short
UPLOAD_NAME = re.compile(r"^[0-9a-f]{32}\.[a-z0-9]+$")  # what security.store_upload names a stored upload
MAX_WARNINGS = 100


def is_shared(settings: ServerSettings) -> bool:
    """Whether other machines can reach the server (``--listen``, ``--share`` or a non-local
    ``--server_name``), so its sessions may belong to different people."""
    return bool(settings.share or settings.host not in LOCAL_HOSTS)


class AppState:
    """The server-wide state. ``engine_factory``: the in-process engine (tests give their own);
    ``worker_engine``: the engine factory of the GPU worker processes (``WorkerSetup.engine_factory``,
    a module-level function), used with ``settings.gpus``. Call :meth:`close` when done."""

    def __init__(self, settings: ServerSettings, engine_factory=None, worker_engine=None):
        self.settings = settings
        self.state_dir = Path(settings.state_dir).resolve()
        self.uploads_dir = uploads_dir(settings)
        self.output_dir = Path(settings.output_dir).resolve()
        # the running job's latent preview, kept in memory (pixels, [H, W, 3] uint8) for the page
        self.previews: dict = {}
        for folder in (self.uploads_dir, self.output_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._engine = None
        self._engine_lock = threading.Lock()
        self._found = None  # the models folders' files, scanned on first use
        self._engine_factory = engine_factory or self._default_engine
        self.shared = is_shared(settings)
        self.workers = None  # the GPU worker processes (--gpus); None: generations run in this process
        if settings.gpus:
            from wan.app.gpu_workers import WorkerPool
            self.workers = WorkerPool.from_settings(settings, engine_factory=worker_engine)
        from wan.app.train_jobs import interrupted_reason  # a training job is resumed, never restarted
        from wan.app.train_request import is_training  # and runs alone: it needs the whole GPU
        self.queue = JobQueue(self.state_dir / QUEUE_FILE, self.run_job, max_queued=settings.max_queue,
                              max_per_session=settings.max_queue_per_session if self.shared else None,
                              interrupted=interrupted_reason,
                              workers=self.workers.slots if self.workers is not None else 1,
                              exclusive=is_training)
        self._warned: set[str] = set()
        self._pruned_at = time.monotonic()
        self.prune_uploads()
        self.queue.subscribe(self._on_queue_change)

    def close(self, timeout: float = 5.0) -> None:
        """Stops the queue's workers after their jobs (waiting up to ``timeout`` seconds), then the
        GPU worker processes (a job still running on one is queued again for the next start)."""
        try:
            self.queue.stop(timeout=timeout)
        finally:
            if self.workers is not None:
                self.workers.close()

    def warn_once(self, text: str) -> None:
        """Logs a warning the first time ``text`` comes (a page refresh that runs every second
        must not repeat it every second)."""
        if text not in self._warned and len(self._warned) < MAX_WARNINGS:
            self._warned.add(text)
            log.warning("%s", text)

    # -- uploads ---------------------------------------------------------------------------------

    def _on_queue_change(self, event: str, job: Job) -> None:
        if event == "finished" and time.monotonic() - self._pruned_at >= PRUNE_INTERVAL_S:
            self.prune_uploads()

    def uploads_in_use(self) -> set[str]:
        """File names of the uploads that waiting or running jobs name (any string value of their
        requests, wherever it sits, that ends in an upload's name)."""
        names: set[str] = set()
        for job in self.queue.jobs(include_finished=False):
            stack = [job.request]
            while stack:
                item = stack.pop()
                if isinstance(item, dict):
                    stack.extend(item.values())
                elif isinstance(item, list):
                    stack.extend(item)
                elif isinstance(item, str) and UPLOAD_NAME.match(os.path.basename(item)):
                    names.add(os.path.basename(item))
        return names

    def prune_uploads(self, now: float | None = None) -> list[str]:
        """Deletes uploads older than ``uploads_max_age_days``, then the oldest ones while the
        folder holds more than ``uploads_max_mb``, and copies a crash cut short; never one that a
        waiting or running job names. Returns the names deleted. Cheap: one listing of the folder."""
        self._pruned_at = time.monotonic()
        now = time.time() if now is None else now
        max_age = self.settings.uploads_max_age_days * 86400
        max_bytes = self.settings.uploads_max_mb * 2**20
        try:
            with os.scandir(self.uploads_dir) as entries:
                found = []
                for entry in entries:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                    if entry.name.startswith(".upload-") and entry.name.endswith(".tmp"):
                        if now - st.st_mtime > PARTIAL_UPLOAD_AGE_S:
                            found.append((0.0, 0, entry.name, True))
                    elif UPLOAD_NAME.match(entry.name):
                        found.append((st.st_mtime, st.st_size, entry.name, False))
        except OSError as e:
            log.warning("could not prune the uploads in %s: %s", self.uploads_dir, e)
            return []
        in_use = self.uploads_in_use()  # after the listing: a job added meanwhile is seen
        doomed = [name for _, _, name, partial in found if partial]
        kept = sorted((f for f in found if not f[3]), key=lambda f: f[0])  # oldest first
        total = sum(size for _, size, _, _ in kept)
        for mtime, size, name, _ in kept:
            if name in in_use:
                continue
            too_old = max_age > 0 and now - mtime > max_age
            too_much = max_bytes > 0 and total > max_bytes
            if too_old or too_much:
                doomed.append(name)
                total -= size
        gone = []
        for name in doomed:
            try:
                os.unlink(self.uploads_dir / name)
                gone.append(name)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("could not delete the upload %s: %s", name, e)
        if gone:
            log.info("pruned %d upload(s) from %s (--uploads_max_age_days %s, --uploads_max_mb %s)", len(gone),
                     self.uploads_dir, self.settings.uploads_max_age_days, self.settings.uploads_max_mb)
        return gone

    # -- the engine, created on first use ----------------------------------------------------

    def _default_engine(self):
        from wan.engine import Engine
        from wan.app.security import limits_of
        engine = Engine(checkpoint_dir=self.settings.checkpoint_dir, lora_dir=self.settings.lora_dir,
                        limits=limits_of(self.settings))
        engine.lora_names_only = True  # clients name LoRAs inside the LoRA folder, never other files
        return engine

    @property
    def engine(self):
        with self._engine_lock:
            if self._engine is None:
                self._engine = self._engine_factory()
            return self._engine

    # -- jobs ----------------------------------------------------------------------------------

    def server_overrides(self) -> dict:
        """Profile settings the server's flags impose on every job (``--attention``, ``--compile``)."""
        out: dict = {}
        if self.settings.attention:
            out["attention"] = [self.settings.attention, "sdpa"]
        if self.settings.compile:
            out["compile"] = True
        return out

    def prepare(self, request):
        """A request as this server runs it: written to the server's output folder (a request naming
        another folder, e.g. from an output made elsewhere, is moved here), its input files
        only from this server's uploads or outputs, within the server's limits.

        Raises:
            RequestError: naming the field.
        """
        from wan.app.security import check_request_paths, is_inside
        overrides = {**self.server_overrides(), **request.profile_overrides}
        inside = isinstance(request.output_dir, str) and is_inside(request.output_dir, self.output_dir)
        request = request.replace(output_dir=str(Path(request.output_dir).resolve()) if inside else str(self.output_dir),
                                  profile_overrides=overrides,
                                  profile=request.profile or self.settings.profile)
        check_request_paths(request, self.settings)
        return request

    # -- model files on this machine --------------------------------------------------------------

    def found_models(self) -> list:
        """The Wan files of the ``models_dir`` folders (scanned once, cached by path, size and mtime in
        the state folder); [] without such folders (nothing imported then: no torch at page build)."""
        if not self.settings.models_dir:
            return []
        if self._found is None:
            from wan.loading.model_folders import scan_folder
            folders = [d for d in self.settings.models_dir if Path(d).is_dir()]
            self._found = scan_folder(folders, cache=self.state_dir / "models_scan.json") if folders else []
        return self._found

    def model_files(self, spec) -> dict[str, str]:
        """Role -> file of the models folders that serves that component of ``spec``."""
        found = self.found_models()
        if not found:
            return {}
        from wan.loading.model_folders import components_found
        from wan.registry import default_registry
        return components_found(spec, found, default_registry())

    def readiness(self, spec, estimate: bool = False):
        """Whether ``spec`` can run here without a download (:mod:`wan.loading.readiness`)."""
        from wan.loading.readiness import readiness
        estimates = {}
        if estimate:  # file sizes from the architecture (no torch: plain arithmetic)
            from wan.optim.planner import file_size_estimates
            estimates = file_size_estimates(spec)
        return readiness(spec, self.settings.checkpoint_dir, self.model_files(spec), estimates=estimates)

    def is_ours(self, path) -> bool:
        """A file this server may read as a job input: an upload it stored, or one of its outputs."""
        from wan.app.security import is_inside
        return is_inside(path, self.uploads_dir) or is_inside(path, self.output_dir)

    def keep_own_inputs(self, request):
        """``request`` with every input file that is not this server's dropped (settings loaded from
        a file may name any path: the form must never make the server read or serve it), and the
        names of the fields that lost a file."""
        from wan.engine.request import INPUT_FIELDS
        changes, dropped = {}, []
        for name in INPUT_FIELDS:
            value = getattr(request, name)
            paths = [value] if isinstance(value, str) else list(value or [])
            kept = [p for p in paths if isinstance(p, str) and Path(p).is_file() and self.is_ours(p)]
            if len(kept) != len(paths):
                dropped.append(name)
                changes[name] = kept if name == "ref_images" else (kept[0] if kept else None)
        return request.replace(**changes), dropped

    def run_job(self, job: Job, progress, cancel) -> RunOutcome:
        """The queue's runner: one job through the engine (or a model download, :mod:`wan.app.downloads`,
        or a LoRA training run, :mod:`wan.app.train_jobs`)."""
        from wan.app.downloads import is_download, run_download
        if is_download(job.request):
            return run_download(self, job, progress, cancel)
        from wan.app.train_request import is_training
        if is_training(job.request):  # -- training (the Train tab) --
            from wan.app.train_jobs import run_training
            if self._engine is not None:  # the generation models leave the device to the training run
                self._engine.models.release()
            if self.workers is not None:  # and so do the idle GPU workers (they start again when needed)
                self.workers.release_idle()
            return run_training(self, job, progress, cancel)
        from wan.app.preview import latent_preview
        from wan.engine.request import GenerationRequest
        request = self.prepare(GenerationRequest.from_dict(job.request))
        last = [0.0]

        def on_step(info) -> None:
            progress(info)
            # at most one preview a second: each one copies the latent off the device
            if info.latent is not None and time.monotonic() - last[0] >= PREVIEW_INTERVAL_S:
                last[0] = time.monotonic()
                try:
                    latent = info.latent[0] if info.latent.dim() == 5 else info.latent
                    self.previews[job.id] = latent_preview(latent)
                except Exception:  # a preview is a nicety: never fail a job over it; say so once
                    log.warning("latent preview failed; no more previews for job %s", job.id, exc_info=True)
                    last[0] = float("inf")
        try:
            from wan.registry import RegistryError, get_model
            try:
                files = self.model_files(get_model(request.model))
            except RegistryError:  # the engine names the unknown model
                files = {}
            if self.workers is not None:
                return self._run_on_workers(job, request, files, progress, cancel)
            extra = {"files": files} if files else {}
            result = self.engine.generate(request, progress=on_step, cancel=cancel, **extra)
        finally:
            self.previews.pop(job.id, None)
        return RunOutcome([str(f) for f in result.files], list(result.notices))

    def _run_on_workers(self, job: Job, request, files: dict, progress, cancel) -> RunOutcome:
        """A generation on the GPU workers (:mod:`wan.app.gpu_workers`); the queue records where it runs."""
        def on_step(info, preview=None) -> None:
            progress(info)
            if preview is not None:
                self.previews[job.id] = preview
        return self.workers.run(request, files or None, on_step, cancel,
                                placed=lambda gpus: self.queue.placed(job.id, gpus))

    def preview_of(self, job_id: str):
        """The latest preview pixels of a running job, or None."""
        return self.previews.get(job_id)
