"""Takes the README's screenshot of the Train tab during a run (``docs/screenshot-train.png``) on the TEST
models, in headless Chromium as the browser tests: two tiny clips, a 30-step run held at step 10 (see
``tests/app_train_harness.py``), the tab's options, buttons, run status and plots.

    .venv/bin/python scripts/screenshot_train.py [--out docs]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.app_harness import launch_chromium, open_studio  # noqa: E402
from tests.app_train_harness import (HeldTrainingServer, fill_options, open_train_tab, preview_dataset,  # noqa: E402
                                     screenshot_run, start_training, wait_run_text, write_dataset)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    out = Path(ap.parse_args().out)
    from playwright.sync_api import sync_playwright

    from wan.testing.tiny_family import ensure_tiny_checkpoints
    with tempfile.TemporaryDirectory(prefix="wan-shots-") as tmp:
        base = Path(tmp)
        ensure_tiny_checkpoints(base / "ckpt")
        write_dataset(base / "studio" / "datasets" / "squares", {"red": "a red square moving right",
                                                                 "blue": "a blue square moving right"})
        server = HeldTrainingServer(base / "studio", base / "ckpt").start()
        server.gate.touch()  # the run waits at step 10
        try:
            with sync_playwright() as p:
                browser = launch_chromium(p)
                page = open_studio(browser.new_context(viewport={"width": 1400, "height": 1300}), server.url)
                open_train_tab(page)
                preview_dataset(page, "squares")
                fill_options(page, "moving_squares", every=20, save_every=10,
                             prompt="sqr, a square moving over a plain background --w 32 --h 32 --f 9 --s 8")
                start_training(page)
                wait_run_text(page, "at step 10")
                screenshot_run(page, out / "screenshot-train.png")
                browser.close()
        finally:
            server.gate.unlink(missing_ok=True)
            server.stop()
    print(f"written {out / 'screenshot-train.png'}")


if __name__ == "__main__":
    main()
