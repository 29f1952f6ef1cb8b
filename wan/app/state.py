"""What every browser session of the studio shares: the settings, one job queue with its one
worker, and the engine (created on the first job, so the page serves before any model import).

Each browser session keeps only its own id (in the browser's storage) and form values; jobs carry
the id of the session that queued them, so each session's gallery shows its own results while the
queue runs everyone's jobs in order.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from wan.app.jobqueue import Job, JobQueue, RunOutcome
from wan.app.security import uploads_dir
from wan.app.settings import ServerSettings

log = logging.getLogger(__name__)
QUEUE_FILE = "queue.json"
PREVIEW_INTERVAL_S = 1.0


class AppState:
    """The server-wide state; build it with :meth:`create`."""

    def __init__(self, settings: ServerSettings, engine_factory=None):
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
        self._engine_factory = engine_factory or self._default_engine
        self.queue = JobQueue(self.state_dir / QUEUE_FILE, self.run_job, max_queued=settings.max_queue)

    # -- the engine, created on first use ----------------------------------------------------

    def _default_engine(self):
        from wan.engine import Engine
        engine = Engine(checkpoint_dir=self.settings.checkpoint_dir, lora_dir=self.settings.lora_dir)
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
        from wan.app.security import check_request_limits, check_request_paths, is_inside
        overrides = {**self.server_overrides(), **request.profile_overrides}
        inside = isinstance(request.output_dir, str) and is_inside(request.output_dir, self.output_dir)
        request = request.replace(output_dir=str(Path(request.output_dir).resolve()) if inside else str(self.output_dir),
                                  profile_overrides=overrides,
                                  profile=request.profile or self.settings.profile)
        check_request_limits(request, self.settings)
        check_request_paths(request, self.settings)
        return request

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
        """The queue's runner: one job through the engine."""
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
            result = self.engine.generate(request, progress=on_step, cancel=cancel)
        finally:
            self.previews.pop(job.id, None)
        return RunOutcome([str(f) for f in result.files], list(result.notices))

    def preview_of(self, job_id: str):
        """The latest preview pixels of a running job, or None."""
        return self.previews.get(job_id)
