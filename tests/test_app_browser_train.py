"""The Train tab in a real browser (Playwright driving Debian's headless Chromium against ``wgp.py serve``
on the TEST models): a dataset of two tiny clips, one without a caption, fixed in the tab; a 30-step
rank-4 run sampling every 10 steps, held at step 10 (``tests/app_train_harness.py``) to see its loss plot
and first sample; Stop, Resume to the end; its LoRA in the LoRA browser; "Use on Generate", then a
generation with it. (``scripts/screenshot_train.py`` takes the README's picture of the tab the same way.)"""

from __future__ import annotations

import time

import pytest

from tests.app_harness import add_job, job_id_of, launch_chromium, open_studio, set_number, wait_for_status
from tests.app_train_harness import (HeldTrainingServer, fill_options, open_train_tab, preview_dataset, start_training,
                                     wait_run_text, write_dataset)
from wan.testing.tiny_family import ensure_tiny_checkpoints


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    checkpoints = tmp_path_factory.mktemp("ckpt")
    ensure_tiny_checkpoints(checkpoints)
    base = tmp_path_factory.mktemp("studio_train")
    write_dataset(base / "datasets" / "clips", {"square_a": "a red square moving right", "square_b": None})
    server = HeldTrainingServer(base, checkpoints).start()
    yield server
    server.stop()


def test_a_first_run_from_dataset_to_generation(studio):
    from playwright.sync_api import sync_playwright
    started = time.time()
    studio.gate.touch()  # the run waits at step 10 until the test lets it go
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = open_studio(browser.new_context(viewport={"width": 1400, "height": 2200}), studio.url)
        open_train_tab(page)
        page.wait_for_function("() => document.querySelector('#train-memory-estimate').innerText.includes('total on')")

        # the dataset: one caption missing, written in the tab
        preview_dataset(page, "clips")
        status = page.inner_text("#train-dataset-status")
        assert "1 item(s) ready" in status and "missing captions (1)" in status and "square_b" in status, status
        assert page.locator("#train-thumbs img").count() == 2
        assert "target_frames = [9]" in page.inner_text("#train-toml")
        page.locator("#train-caption-text textarea, #train-caption-text input").first.fill("a blue square moving")
        page.click("#train-caption-save")
        page.wait_for_function("() => document.querySelector('#train-dataset-status').innerText.includes('No warnings')")
        assert (studio.datasets / "clips" / "square_b.txt").read_text().strip() == "a blue square moving"

        # a short run, held at step 10: the loss plot and the first sample
        fill_options(page, "tinytest")
        first = start_training(page)
        wait_run_text(page, "loss")
        page.wait_for_function("() => document.querySelectorAll('#train-samples video').length >= 1", timeout=90_000)
        wait_run_text(page, "at step 10")
        page.wait_for_function("() => document.querySelector('#train-loss canvas, #train-loss svg')")
        assert "running" in page.inner_text("#train-run-status")

        # Stop saves the state at the step reached; Resume goes on from it to the end
        page.click("#train-stop")
        page.wait_for_function("() => document.querySelector('#train-message').innerText.includes('Stopping')")
        studio.gate.unlink()
        wait_run_text(page, "cancelled")
        wait_run_text(page, "Resume continues it from step 10")
        page.click("#train-resume")
        page.wait_for_function("() => document.querySelector('#train-message').innerText.includes('resume from step 10')")
        wait_run_text(page, "done", timeout_ms=120_000)
        assert first not in page.inner_text("#train-run-status")  # the page follows the resumed job
        lora = studio.lora_dir / "test" / "tinytest.safetensors"
        assert lora.is_file() and (studio.lora_dir / "presets" / "tinytest.json").is_file()

        # the LoRA browser lists it without a restart
        page.get_by_role("tab", name="Generate").click()
        page.get_by_text("LoRAs", exact=True).first.click()
        page.click("#lora-refresh")
        page.wait_for_function("() => document.querySelector('#lora-table').innerText.includes('tinytest')")
        assert "sqr" in page.inner_text("#lora-table")  # its trigger words

        # Use on Generate: the Generate tab with the LoRA selected, then a job with it
        page.get_by_role("tab", name="Train").click()
        page.click("#train-use")
        page.wait_for_function("() => document.querySelector('#loras') && "
                               "document.querySelector('#loras').innerText.includes('tinytest')")
        assert page.locator("#prompt textarea").input_value().startswith("sqr")
        set_number(page, "steps", 2)
        job = job_id_of(add_job(page))
        wait_for_status(page, job, "done")
        browser.close()
    assert "Traceback" not in studio.log(), studio.log()[-3000:]
    assert time.time() - started < 150
