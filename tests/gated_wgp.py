"""``wgp.py`` with a gate, for tests that must catch a job while it runs.

A job whose prompt contains ``[hold]`` waits after each step for as long as the file named by
``WAN_TEST_GATE`` exists (a cancel still ends it at the next step boundary). A test creates the
file before queueing the job and deletes it to let the job go on: the job is held however fast
the machine is, where a long job would only probably still be running.
"""

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wan.cli import main  # noqa: E402
from wan.engine.engine import Engine  # noqa: E402

GATE = Path(os.environ["WAN_TEST_GATE"])
_generate = Engine.generate


def _held(progress, cancel):
    def step_done(info):
        if progress is not None:
            progress(info)
        while GATE.exists() and not (cancel is not None and cancel.cancelled):
            time.sleep(0.01)
    return step_done


def generate(self, request, progress=None, cancel=None, **kwargs):
    if "[hold]" in request.prompt:
        progress = _held(progress, cancel)
    return _generate(self, request, progress=progress, cancel=cancel, **kwargs)


Engine.generate = generate

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
