"""The newcomer tour (issue 13): what a first-time user does in the first ten minutes, in a real
browser against the real server on the TEST models. It switches between every model and task,
uploads inputs and switches away and back, adds jobs and aborts, cancels and clears them, adds a job
for a model that is not ready, tries each bad upload, reloads the page and resets the form.

It fails on any error toast, any page error in the browser console and any traceback in the server
log; the expected refusals are shown in the page (never as error toasts) and each is checked for
its exact words."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from tests.app_harness import (StudioServer, add_job, choose, job_id_of, launch_chromium, open_studio, set_number,
                               wait_for_status)
from wan.registry import list_models
from wan.testing.tiny_family import ensure_tiny_checkpoints

READY = " · ✓ ready"
TEST_MODELS = [s for s in list_models() if s.test_model]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    checkpoints = tmp_path_factory.mktemp("ckpt")
    ensure_tiny_checkpoints(checkpoints)
    server = StudioServer(tmp_path_factory.mktemp("studio"), checkpoints, gated=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


class Watch:
    """Collects what must never appear: error toasts, page errors, console errors."""

    def __init__(self, page):
        self.page, self.problems = page, []
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("console", lambda m: self.problems.append(f"console: {m.text}") if m.type == "error" else None)

    def check(self, where: str, expected_toast: str | None = None) -> None:
        """No toast and no error so far; ``expected_toast``: one toast with exactly this text is the
        expected refusal (then it is closed)."""
        toasts = [" ".join(t.replace("×", " ").split()) for t in self.page.locator(".toast-body").all_inner_texts()]
        if expected_toast is not None:
            assert toasts == [expected_toast], f"{where}: {toasts}"
            self.page.locator(".toast-close").first.click()
            toasts = []
        assert not toasts and not self.problems, f"{where}: {toasts} {self.problems}"


def model_label(spec) -> str:
    return f"{spec.display_name} [test model]{READY}"


def message(page, elem_id: str, starts: str, timeout_ms: int = 30_000) -> str:
    """The text of a message element once it starts with ``starts`` (a progress timer, had one been
    drawn there, would come first and fail the wait)."""
    page.wait_for_function("([id, s]) => document.querySelector('#' + id).innerText.trim().startsWith(s)",
                           arg=[elem_id, starts], timeout=timeout_ms)
    return page.inner_text(f"#{elem_id}").strip()


def shows(page, elem_id: str, text: str, timeout_ms: int = 30_000) -> None:
    """Waits until the element shows exactly ``text``; the assertion says what it showed instead."""
    try:
        page.wait_for_function("([id, t]) => document.querySelector('#' + id).innerText.trim() === t",
                               arg=[elem_id, text], timeout=timeout_ms)
    except Exception:
        raise AssertionError(f"#{elem_id} shows {page.inner_text('#' + elem_id)!r}, not {text!r}") from None


def upload(page, elem_id: str, path) -> None:
    page.set_input_files(f"#{elem_id} input[type=file]", str(path))


def bad_files(tmp_path):
    (tmp_path / "notimage.png").write_bytes(b"this is text, not a PNG")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 and then nothing a video needs")
    good = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    return good


def test_a_newcomer_tour_meets_no_error(browser, studio, tmp_path):
    good = bad_files(tmp_path)
    context = browser.new_context(viewport={"width": 1440, "height": 1800})
    page = open_studio(context, studio.url)
    watch = Watch(page)
    try:
        # every model and each of its tasks; the inputs shown are the task's
        for spec in TEST_MODELS:
            choose(page, "model", model_label(spec))
            page.wait_for_function("(t) => document.querySelector('#task input').value === t", arg=spec.tasks[0])
            for task in spec.tasks[1:]:
                choose(page, "task", task)
                time.sleep(0.3)
            watch.check(f"switching to {spec.id}")
        # t2i is one frame
        choose(page, "model", model_label(TEST_MODELS[0]))
        choose(page, "task", "t2i")
        page.wait_for_function("() => document.querySelector('#frames input').value === '1'")
        choose(page, "task", "t2v")
        page.wait_for_function("() => document.querySelector('#frames input').value === '9'")

        # bad uploads are refused when they arrive, in the user's words, and cleared
        choose(page, "model", model_label(next(s for s in TEST_MODELS if s.id == "test-tiny-i2v")))
        page.wait_for_selector("#image input[type=file]", state="attached")
        for name, expected in (("notimage.png", "Start image: notimage.png is not a readable image (PNG, JPEG, WebP…)"),
                               ("empty.png", "Start image: empty.png is empty (0 bytes)")):
            upload(page, "image", tmp_path / name)
            shows(page, "upload-message", f"⚠️ {expected}", timeout_ms=10_000)
            watch.check(f"uploading {name}")
        upload(page, "image", good)
        page.wait_for_function("() => document.querySelector('#upload-message').innerText.trim() === ''")
        # ... and an i2v upload left behind does not block a t2v job
        choose(page, "model", model_label(TEST_MODELS[0]))
        set_number(page, "steps", 1)
        assert add_job(page, "after an i2v upload").startswith("Queued 1 job")
        choose(page, "model", model_label(next(s for s in TEST_MODELS if s.id == "test-tiny-i2v")))
        choose(page, "model", model_label(TEST_MODELS[0]))
        choose(page, "task", "v2v")
        page.wait_for_selector("#video input[type=file]", state="attached")
        upload(page, "video", tmp_path / "clip.mp4")
        shown = message(page, "upload-message", "⚠️")
        assert shown in ("⚠️ Input video: clip.mp4 has no video stream",
                         "⚠️ Input video: clip.mp4 is not a readable video (MP4, WebM, MOV, MKV…)"), shown
        # the browser's own video player refuses it too, before our check clears it: gradio's toast
        watch.check("bad uploads", expected_toast="Error Video not playable")

        # a model that is not ready is refused when added, with what to do
        real = next(s for s in list_models() if s.id == "wan2.1-t2v-1.3B")
        choose(page, "model", f"{real.display_name} · ⬇ missing transformer (~2.9 GB), vae (~0.5 GB), "
                              "text_encoder (~11.4 GB), tokenizer")
        choose(page, "task", "t2v")
        refused = add_job(page, "not here yet").splitlines()
        assert refused[0] == ("⚠️ model: 'wan2.1-t2v-1.3B' is not allowed; a model that is ready on this machine. "
                              "wan2.1-t2v-1.3B is not ready on this machine; missing:"), refused
        ckpt = studio.checkpoints.resolve()
        assert refused[1] == ("- transformer (~2.9 GB): " f"{ckpt}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/split_files/"
                              "diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors"), refused
        assert refused[-1] == ("Get them with the Download button under the model picker, or with python wgp.py "
                               "download wan2.1-t2v-1.3B; or put the files in a models folder (--models_dir), where "
                               "they are recognised by their tensors."), refused
        watch.check("a model that is not ready")

        # jobs: abort the running one, cancel a queued one, clear the finished ones
        choose(page, "model", model_label(TEST_MODELS[0]))
        choose(page, "task", "t2v")
        studio.gate.touch()
        set_number(page, "steps", 2)
        held = job_id_of(add_job(page, "held [hold]"))
        waiting = job_id_of(add_job(page, "waiting"))
        wait_for_status(page, held, "running")
        page.click("#job-pick input")
        page.get_by_role("option").filter(has_text=waiting).first.click()
        page.keyboard.press("Escape")
        page.click("#cancel-selected")
        wait_for_status(page, waiting, "cancelled")
        wait_for_status(page, held, "running")  # cancelling the picked job left the running one alone
        page.click("#abort")
        wait_for_status(page, held, "cancelled")
        studio.gate.unlink()
        page.click("#clear-finished")
        page.wait_for_function("(id) => !document.querySelector('#queue-table').innerText.includes(id)", arg=held)
        watch.check("the queue")

        # the form is remembered per model across a reload, and can be reset
        page.fill("#prompt textarea", "a fox in the snow, remembered")
        page.locator("#prompt textarea").press("Tab")
        set_number(page, "steps", 3)
        time.sleep(1.0)
        page.reload()
        page.wait_for_function("() => document.querySelector('#prompt textarea')?.value === "
                               "'a fox in the snow, remembered'")
        assert page.input_value("#steps input") == "3"
        page.click("#reset-form")
        page.wait_for_function("() => document.querySelector('#prompt textarea').value === ''")
        assert page.input_value("#steps input") == "4"
        watch.check("reload and reset")
    finally:
        context.close()
    log = studio.log()
    assert "Traceback" not in log and "is not in the list of choices" not in log, log[-3000:]
