"""Worker engines for the tests of the GPU workers (``tests/test_app_gpus.py``), in a module of
their own: a worker process imports it to unpickle its engine factory, and this one is light (no
gradio, no pytest), so a worker starts in the time of torch and the engine.
"""

from __future__ import annotations

import time
from pathlib import Path

from wan.app.gpu_workers import default_engine


def held_engine(gate: Path, setup, device):
    """A worker's engine whose rank 0 waits after each step while the file ``gate`` exists (a
    cancel still ends the wait): a job is caught running however fast the machine is."""
    engine = default_engine(setup, device)
    plain = engine.generate

    def generate(req, progress=None, cancel=None, **kwargs):
        if progress is not None:
            report = progress

            def progress(info):
                report(info)
                while gate.exists() and not (cancel is not None and cancel.cancelled):
                    time.sleep(0.01)
        return plain(req, progress=progress, cancel=cancel, **kwargs)
    engine.generate = generate
    return engine


def broken_engine(setup, device):
    raise RuntimeError("no engine here: the checkpoints folder is on a disk that is not mounted")
