"""Takes the README's screenshots of the app on the TEST models (headless Chromium, as the browser
tests): the first page, a failed job's error in the job view, and the model picker showing which
models are ready and what the others miss.

    .venv/bin/python scripts/screenshots.py [--out docs]

A job is made to fail on purpose with a LoRA whose shapes fit no TEST model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.app_harness import StudioServer, add_job, launch_chromium, open_studio, set_number  # noqa: E402


def wrong_lora(path: Path) -> None:
    """A musubi-layout LoRA for a DiT 512 wide: it fits none of the TEST models (256 wide)."""
    import torch
    from safetensors.torch import save_file
    key = "lora_unet_blocks_0_self_attn_q"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 512), f"{key}.lora_up.weight": torch.zeros(512, 4),
               f"{key}.alpha": torch.tensor(4.0)}, str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    out = Path(ap.parse_args().out)
    from playwright.sync_api import sync_playwright

    from wan.testing.tiny_family import ensure_tiny_checkpoints
    with tempfile.TemporaryDirectory(prefix="wan-shots-") as tmp:
        base = Path(tmp)
        ensure_tiny_checkpoints(base / "ckpt")
        server = StudioServer(base / "studio", base / "ckpt").start()
        wrong_lora(server.lora_dir / "test" / "made_for_another_model.safetensors")
        try:
            with sync_playwright() as p:
                browser = launch_chromium(p)
                page = open_studio(browser.new_context(viewport={"width": 1440, "height": 1100}), server.url)
                page.fill("#prompt textarea", "a red fox running through fresh snow at dawn, cinematic")
                set_number(page, "steps", 4)
                add_job(page)
                time.sleep(2)
                page.screenshot(path=str(out / "screenshot.png"))
                # the model picker: ready models and what the others need
                page.click("#model input")
                time.sleep(0.5)
                page.screenshot(path=str(out / "screenshot-models.png"))
                page.keyboard.press("Escape")
                # a job that fails, and its whole error where the user looks
                page.click("#lora-browser")
                page.get_by_role("button", name="Refresh", exact=True).click()
                page.wait_for_function("() => document.querySelector('#lora-table').innerText.includes('made_for')")
                page.click("#loras input")
                page.get_by_role("option").filter(has_text="made_for_another_model").first.click()
                page.keyboard.press("Escape")
                failing = add_job(page, "this one fails: its LoRA was made for another model").rsplit(" ", 1)[-1]
                page.wait_for_function("() => document.querySelector('#message').innerText.includes('failed')",
                                       timeout=120_000)
                page.click("#job-pick input")
                page.get_by_role("option").filter(has_text=failing).first.click()
                page.keyboard.press("Escape")
                page.wait_for_function("() => document.querySelector('#job-detail').innerText.includes('failed')")
                page.locator("#add-job").scroll_into_view_if_needed()
                page.screenshot(path=str(out / "screenshot-error.png"))
                browser.close()
        finally:
            server.stop()
    print(f"wrote {out}/screenshot.png, screenshot-models.png, screenshot-error.png")


if __name__ == "__main__":
    main()
