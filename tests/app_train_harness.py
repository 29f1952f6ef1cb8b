"""Helpers of the Train tab's tests (and ``scripts/screenshot_train.py``): tiny clips with captions, a
studio server whose training runs can be held at a step, and the browser steps that fill the tab.

The held server runs ``wgp.py`` with :meth:`wan.train.trainer.Trainer.train` wrapped: after a call ends
at step ``WAN_TRAIN_HOLD_AT`` (10) or later, it waits while the file ``WAN_TEST_GATE`` exists. The Train
tab's runner trains one step per call, so a test sees the run sit at step 10 (its sample and saved state
there) however fast the machine is, and lets it go on by deleting the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.app_harness import ROOT, StudioServer, choose, set_number

HOLD_AT = 10
HELD_ENTRY = """\
import os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from wan.train.trainer import Trainer
GATE = Path(os.environ["WAN_TEST_GATE"])
HOLD_AT = int(os.environ.get("WAN_TRAIN_HOLD_AT", "{hold}"))
_train = Trainer.train


def train(self, until_step=None):
    result = _train(self, until_step)
    while GATE.exists() and self.progress.step >= HOLD_AT:
        time.sleep(0.02)
    return result


Trainer.train = train
from wan.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_clip(path: Path, seed: int, size: int = 32, frames: int = 9) -> None:
    """A tiny MP4: a coloured square moving across a plain background."""
    import av
    rng = np.random.default_rng(seed)
    back, front = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=16, options={"qscale": "2"})
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for t in range(frames):
            frame = np.empty((size, size, 3), np.uint8)
            frame[:] = back
            x = (t * size // frames) % (size - size // 4)
            frame[size // 4: size // 2, x: x + size // 4] = front
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_dataset(folder: Path, captions: dict[str, str | None], size: int = 32, frames: int = 9) -> Path:
    """``<name>.mp4`` per entry, with ``<name>.txt`` where the caption is not None."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, caption) in enumerate(captions.items()):
        write_clip(folder / f"{name}.mp4", seed, size, frames)
        if caption is not None:
            (folder / f"{name}.txt").write_text(caption)
    return folder


class HeldTrainingServer(StudioServer):
    """The studio on the TEST models, its training runs held at step ``HOLD_AT`` while ``self.gate`` exists."""

    def __init__(self, base: Path, checkpoints: Path, *extra: str, **kw):
        super().__init__(base, checkpoints, "--datasets-dir", str(Path(base) / "datasets"), *extra, **kw)
        self.datasets = Path(base) / "datasets"

    def command(self) -> list[str]:
        self.base.mkdir(parents=True, exist_ok=True)
        entry = self.base / "held_train_wgp.py"
        entry.write_text(HELD_ENTRY.format(root=str(ROOT), hold=HOLD_AT))
        command = super().command()
        command[1] = str(entry)
        return command


# -- the Train tab in a browser ------------------------------------------------------------------

def open_train_tab(page) -> None:
    page.get_by_role("tab", name="Train").click()
    page.wait_for_selector("#train-dataset input")


def fill(page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(text)
    box.press("Tab")


def preview_dataset(page, dataset: str, size: int = 32, frames: int = 9) -> None:
    choose(page, "train-dataset", dataset)
    set_number(page, "train-width", size)
    set_number(page, "train-height", size)
    set_number(page, "train-frames", frames)
    page.click("#train-preview")
    page.wait_for_function("() => document.querySelector('#train-dataset-status').innerText.includes('ready to train')")


def fill_options(page, name: str, steps: int = 30, rank: int = 4, every: int = 10,
                 prompt: str = "a small square moving --w 32 --h 32 --f 9 --s 2", save_every: int | None = None) -> None:
    fill(page, "train-name", name)
    fill(page, "train-trigger", "sqr")
    for elem_id, value in (("train-rank", rank), ("train-alpha", rank), ("train-lr", 0.001), ("train-steps", steps),
                           ("train-sample-every", every), ("train-save-every", save_every or every),
                           ("train-seed", 7)):
        set_number(page, elem_id, value)
    fill(page, "train-prompts", prompt)


def start_training(page) -> str:
    """Clicks Start; returns the queued job's id."""
    page.click("#train-start")
    page.wait_for_function("() => /Queued|⚠️/.test(document.querySelector('#train-message').innerText)")
    text = page.inner_text("#train-message").strip()
    assert text.startswith("Queued"), text
    return text.split(":", 1)[1].strip().split(",")[0].split(";")[0].strip(". ")


def wait_run_text(page, text: str, timeout_ms: int = 90_000) -> None:
    page.wait_for_function("(t) => document.querySelector('#train-run-status').innerText.includes(t)", arg=text,
                           timeout=timeout_ms)


def screenshot_run(page, path) -> None:
    """The Train tab mid-run as the README shows it: the options, the buttons and the run's plots."""
    size = page.viewport_size
    page.set_viewport_size({"width": 1400, "height": 1300})
    page.evaluate("document.querySelector('#train-memory').scrollIntoView({block: 'start'})")
    page.evaluate("window.scrollBy(0, -12)")
    page.wait_for_timeout(800)  # the plots draw
    page.screenshot(path=str(path))
    page.set_viewport_size(size)
