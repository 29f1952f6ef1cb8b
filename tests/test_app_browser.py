"""The studio in a real browser: Playwright drives Debian's headless Chromium against the real
server (``python wgp.py serve``) started on the TEST model family in a subprocess."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.app_harness import (StudioServer, add_job, choose, job_id_of, launch_chromium, open_studio, set_number,
                               wait_for_status)
from wan.engine.engine import request_from_metadata
from wan.engine.media_out import read_metadata
from wan.testing.tiny_family import ensure_tiny_checkpoints

READY = " · ✓ ready"  # the model picker says whether a model can run here
T2V = "TEST tiny Wan 2.1 t2v [test model]" + READY
I2V = "TEST tiny Wan 2.1 i2v (CLIP) [test model]" + READY


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    checkpoints = tmp_path_factory.mktemp("ckpt")
    ensure_tiny_checkpoints(checkpoints)
    server = StudioServer(tmp_path_factory.mktemp("studio"), checkpoints, gated=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium, studio):
    context = chromium.new_context(viewport={"width": 1400, "height": 1800})
    yield open_studio(context, studio.url)
    context.close()


def request_of(path):
    return request_from_metadata(read_metadata(path))


def outputs_of(studio, job_id: str, suffix=".mp4") -> list:
    """Files of one job, from the queue file the server keeps."""
    import json
    jobs = json.loads((studio.state_dir / "queue.json").read_text())["jobs"]
    job = next(j for j in jobs if j["id"] == job_id)
    return [f for f in job["files"] if f.endswith(suffix)]


def video_frames(path) -> np.ndarray:
    import imageio.v3 as iio
    return iio.imread(path)


def test_generate_t2v_shows_the_video_in_the_gallery_and_writes_the_file(page, studio):
    choose(page, "task", "t2v")
    set_number(page, "steps", 2)
    job = job_id_of(add_job(page, "a red fox running in fresh snow"))
    wait_for_status(page, job, "done")
    page.wait_for_selector("#gallery video")
    files = outputs_of(studio, job)
    assert len(files) == 1 and files[0].startswith(str(studio.output_dir.resolve()))
    req = request_of(files[0])
    assert req.prompt == "a red fox running in fresh snow" and req.steps == 2 and req.task == "t2v"
    assert video_frames(files[0]).shape[0] == req.frames


def test_i2v_with_an_uploaded_image(page, studio, tmp_path):
    choose(page, "model", I2V)
    page.wait_for_selector("#image input[type=file]", state="attached")
    picture = tmp_path / "my start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(picture)
    page.set_input_files("#image input[type=file]", str(picture))
    page.wait_for_selector("#image img")
    set_number(page, "steps", 2)
    job = job_id_of(add_job(page, "the picture comes alive"))
    wait_for_status(page, job, "done")
    req = request_of(outputs_of(studio, job)[0])
    assert req.task == "i2v" and req.model == "test-tiny-i2v"
    stored = studio.state_dir.resolve() / "uploads"
    assert req.image.startswith(str(stored)) and "start" not in req.image  # a fresh name, never the browser's


def saved_jobs(studio) -> dict:
    import json
    return {j["id"]: j for j in json.loads((studio.state_dir / "queue.json").read_text())["jobs"]}


def pick_job(page, job_id: str) -> None:
    page.click("#job-pick input")
    page.get_by_role("option").filter(has_text=job_id).first.click()
    page.keyboard.press("Escape")


def test_queue_jobs_reorder_remove_and_abort_the_running_one(page, studio):
    studio.gate.touch()  # the "[hold]" job waits after its first step until aborted
    set_number(page, "steps", 3)
    slow = job_id_of(add_job(page, "a slow one [hold]"))
    set_number(page, "steps", 2)
    quick, second, dropped = (job_id_of(add_job(page, f"quick {k}")) for k in range(3))
    wait_for_status(page, slow, "running")
    pick_job(page, second)
    page.get_by_role("button", name="Move up", exact=True).click()
    page.wait_for_function("(id) => document.querySelector('#queue-message').innerText.includes('Moved ' + id)",
                           arg=second)
    pick_job(page, dropped)
    page.get_by_role("button", name="Remove", exact=True).click()
    page.wait_for_function("(id) => document.querySelector('#queue-message').innerText.includes('Removed ' + id)",
                           arg=dropped)
    page.get_by_role("button", name="Abort running", exact=True).click()
    wait_for_status(page, slow, "cancelled")
    studio.gate.unlink()
    wait_for_status(page, quick, "done")
    jobs = saved_jobs(studio)
    assert outputs_of(studio, slow) == [] and len(outputs_of(studio, quick)) == 1 and dropped not in jobs
    assert jobs[second]["finished"] < jobs[quick]["started"]  # moved up: it ran first


def musubi_lora(path, dim=256, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for b in (0, 1):
        key = f"lora_unet_blocks_{b}_self_attn_q"
        state[f"{key}.lora_down.weight"] = torch.randn(rank, dim, generator=g) * 0.3
        state[f"{key}.lora_up.weight"] = torch.randn(dim, rank, generator=g) * 0.3
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def test_a_lora_dropped_in_the_folder_appears_after_refresh_and_changes_the_output(page, studio):
    page.click("#lora-browser")  # open the accordion
    page.get_by_role("button", name="Refresh", exact=True).click()
    page.wait_for_selector("#lora-table")
    assert "drop_in" not in page.inner_text("#lora-browser")
    musubi_lora(studio.lora_dir / "test" / "drop_in.safetensors")
    page.get_by_role("button", name="Refresh", exact=True).click()
    page.wait_for_function("() => document.querySelector('#lora-table').innerText.includes('drop_in')")
    set_number(page, "steps", 2)
    set_number(page, "seed", 11)
    plain = job_id_of(add_job(page, "same seed twice"))
    choose(page, "loras", "✓ drop_in (test)")
    page.fill("#lora-multipliers textarea, #lora-multipliers input", "1.0")
    styled = job_id_of(add_job(page))
    wait_for_status(page, styled, "done")
    a, b = outputs_of(studio, plain)[0], outputs_of(studio, styled)[0]
    assert request_of(b).loras[0].path == "test/drop_in.safetensors" and request_of(a).seed == request_of(b).seed
    assert np.abs(video_frames(a).astype(int) - video_frames(b).astype(int)).max() > 0
    # presets: save the selection, clear it, load it back, delete it
    page.fill("#preset input", "my look")
    page.get_by_role("button", name="Save preset", exact=True).click()
    page.wait_for_function("() => document.querySelector('#lora-status').innerText.includes('Saved preset')")
    assert (studio.lora_dir / "presets" / "my look.json").is_file()
    page.fill("#lora-multipliers textarea, #lora-multipliers input", "")
    page.locator("#loras").get_by_role("button").first.click()  # the chip's remove button
    page.wait_for_function("() => !document.querySelector('#loras').innerText.includes('drop_in')")
    page.get_by_role("button", name="Load preset", exact=True).click()
    page.wait_for_function("() => document.querySelector('#lora-status').innerText.includes('Loaded preset')")
    assert page.input_value("#lora-multipliers textarea, #lora-multipliers input") == "1.0"
    assert "drop_in" in page.inner_text("#loras")
    page.get_by_role("button", name="Delete preset", exact=True).click()
    page.wait_for_function("() => document.querySelector('#lora-status').innerText.includes('Deleted preset')")
    assert not (studio.lora_dir / "presets" / "my look.json").exists()
    # a preset name that would leave the preset folder is refused, and nothing is written
    page.fill("#preset input", "../evil")
    page.get_by_role("button", name="Save preset", exact=True).click()
    page.wait_for_function("() => document.querySelector('#lora-status').innerText.includes('not allowed')")
    assert not (studio.lora_dir / "evil.json").exists() and not list(studio.base.glob("**/evil.json"))


def test_load_settings_from_an_earlier_output(page, studio):
    set_number(page, "steps", 3)
    set_number(page, "seed", 1234)
    job = job_id_of(add_job(page, "settings to restore later"))
    wait_for_status(page, job, "done")
    page.fill("#prompt textarea", "something else")
    set_number(page, "steps", 7)
    page.locator("#gallery video, #gallery img").first.click()
    page.wait_for_function("() => document.querySelector('#output-settings').innerText.includes('settings to restore')")
    page.get_by_role("button", name="Load these settings into the form", exact=True).click()
    page.wait_for_function("() => document.querySelector('#prompt textarea').value === 'settings to restore later'")
    assert page.input_value("#steps input") == "3" and page.input_value("#seed input") == "1234"
    # "Loaded the settings of ..." shows by the button that was pressed, not below the settings box
    page.wait_for_function("() => document.querySelector('#gallery-message').innerText.includes('Loaded the settings')")
    button, said = page.locator("#load-settings").bounding_box(), page.locator("#gallery-message").bounding_box()
    assert 0 <= said["y"] - (button["y"] + button["height"]) < 60 and abs(said["x"] - button["x"]) < 40
    # dropping the file itself restores the same settings
    page.fill("#prompt textarea", "changed again")
    page.set_input_files("#drop-output input[type=file]", outputs_of(studio, job)[0])
    page.wait_for_function("() => document.querySelector('#prompt textarea').value === 'settings to restore later'")
    # "Continue this video": its settings, the video as the one to continue, and a job that follows it
    page.fill("#prompt textarea", "changed once more")
    page.get_by_role("button", name="Continue this video", exact=True).click()
    page.wait_for_function("() => document.querySelector('#gallery-message').innerText.includes('video to continue')")
    assert page.input_value("#prompt textarea") == "settings to restore later"
    page.wait_for_selector("#continue-video video")
    follow = job_id_of(add_job(page, "what happens next"))
    wait_for_status(page, follow, "done")
    first, after = outputs_of(studio, job)[0], outputs_of(studio, follow)[0]
    continued = request_of(after).continue_video  # the page sent the video back: kept as an upload
    assert Path(continued).read_bytes() == Path(first).read_bytes()
    assert len(video_frames(after)) == len(video_frames(first)) + request_of(after).frames


def test_an_invalid_field_is_named_and_the_server_keeps_serving(page, studio):
    set_number(page, "frames", 10)
    message = add_job(page, "ten frames cannot be")
    assert message.startswith("⚠️") and "frames" in message and "10" in message
    set_number(page, "frames", 9)
    set_number(page, "steps", 2)
    job = job_id_of(add_job(page, "nine frames can"))
    wait_for_status(page, job, "done")


def test_two_sessions_each_get_their_own_results(chromium, studio):
    pages = [open_studio(chromium.new_context(), studio.url) for _ in range(2)]
    jobs = {}
    for i, p in enumerate(pages):
        set_number(p, "steps", 2)
        jobs[i] = [job_id_of(add_job(p, f"session {i} job {k}")) for k in range(2)]
    for i, p in enumerate(pages):
        for job in jobs[i]:
            wait_for_status(p, job, "done")
    for i, p in enumerate(pages):
        p.wait_for_function("() => document.querySelectorAll('#gallery video').length === 2")
        mine = [outputs_of(studio, j)[0] for j in jobs[i]]
        assert all(request_of(f).prompt.startswith(f"session {i}") for f in mine)
    saved = saved_jobs(studio)
    sessions = [{saved[j]["session"] for j in jobs[i]} for i in range(2)]
    assert all(len(s) == 1 for s in sessions) and sessions[0] != sessions[1]  # one queue, two sessions
    assert all(saved[j]["status"] == "done" for j in jobs[0] + jobs[1])
    for p in pages:
        p.context.close()


def test_a_two_expert_model_shows_its_second_guidance_and_runs(page, studio):
    assert not page.locator("#guidance-high-noise").is_visible()
    choose(page, "model", "TEST tiny Wan 2.2 two-expert t2v (A14B-style) [test model]" + READY)
    page.wait_for_selector("#guidance-high-noise", state="visible")
    set_number(page, "guidance-high-noise", 6.5)
    set_number(page, "steps", 4)
    job = job_id_of(add_job(page, "two experts"))
    wait_for_status(page, job, "done")
    req = request_of(outputs_of(studio, job)[0])
    assert req.model == "test-tiny-t2v-a14b" and req.guidance_high_noise == 6.5 and req.boundary is not None


def test_guidance_phase_fields_show_with_their_phases_and_a_recipe_profile_fills_the_form(page, studio):
    """Issue 17: the phase 2/3 fields show when there are that many phases (the expert-switch phase
    only on a two-expert model); picking lightning-3phase puts its recipe in the form."""
    choose(page, "model", "TEST tiny Wan 2.2 two-expert t2v (A14B-style) [test model]" + READY)
    page.wait_for_selector("#switch-threshold", state="visible")  # A14B: two phases, the expert switch
    assert not page.locator("#switch-threshold2").is_visible() and not page.locator("#model-switch-phase").is_visible()
    set_number(page, "guidance-phases", 3)
    page.wait_for_selector("#switch-threshold2", state="visible")
    page.wait_for_selector("#model-switch-phase", state="visible")
    choose(page, "profile", "lightning-3phase")
    page.wait_for_function("() => document.querySelector('#steps input').value === '8'")
    assert page.locator("#guidance3-scale input").input_value() == "1"
    assert page.locator("#switch-threshold input").input_value() == "965"
    assert page.locator("#boundary input").input_value() == "0.8"
    choose(page, "model", T2V)
    page.wait_for_selector("#switch-threshold", state="hidden")


def test_the_model_picker_says_what_is_ready_and_a_missing_model_is_refused_when_added(chromium, tmp_path):
    """Issue 12: with --models_dir on a ComfyUI-style tree (misleading names), the TEST model is ready
    from those files; a real model shows what is missing, and adding a job for it is refused at once
    with the files and the ways to get them."""
    import shutil

    from wan.loading.download import local_paths
    from wan.registry import get_model
    checkpoints = tmp_path / "ckpt"
    ensure_tiny_checkpoints(checkpoints)
    paths = local_paths(get_model("test-tiny-t2v"), checkpoints, "fp32")
    tree = tmp_path / "ComfyUI" / "models"
    for role, sub in (("transformer", "diffusion_models"), ("vae", "vae"), ("text_encoder", "text_encoders")):
        (tree / sub).mkdir(parents=True)
        shutil.copy(paths[role], tree / sub / f"my_{sub}_v2.safetensors")
    server = StudioServer(tmp_path / "studio", tmp_path / "empty_ckpt", "--models_dir", str(tree)).start()
    context = chromium.new_context(viewport={"width": 1400, "height": 1800})
    try:
        page = open_studio(context, server.url)

        # the picker's labels as the page holds them (its list is long and drawn lazily)
        labels = page.evaluate("""() => window.gradio_config.components
            .filter(c => c.props && c.props.elem_id === 'model')[0].props.choices.map(c => c[0])""")

        def option(text: str) -> str:
            return next((label for label in labels if label.startswith(text)), "")
        t2v = option("TEST tiny Wan 2.1 t2v")
        assert t2v.endswith("✓ ready (from your folders: transformer, vae, text_encoder)"), t2v
        real = option("Wan 2.1 Text-to-Video 1.3B")
        assert real.endswith("⬇ missing transformer (~2.9 GB), vae (~0.5 GB), text_encoder (~11.4 GB), tokenizer"), real
        choose(page, "model", t2v)
        page.wait_for_function("document.querySelector('#readiness').innerText.includes('Ready')")
        assert f"transformer (your models folder: {tree / 'diffusion_models'}" in page.inner_text("#readiness")
        assert not page.locator("#download-model").is_visible()
        choose(page, "model", real)
        page.wait_for_function("document.querySelector('#readiness').innerText.includes('Not on this machine')")
        shown = page.inner_text("#readiness")
        assert "Missing, ~14.7 GB in all" in shown and f"text_encoder (~11.4 GB): {tmp_path / 'empty_ckpt'}" in shown
        assert page.locator("#download-model").is_visible()
        message = add_job(page, "a fox")
        assert "wan2.1-t2v-1.3B is not ready on this machine" in message and "python wgp.py download" in message
        assert "transformer (~2.9 GB)" in message
        assert not (tmp_path / "empty_ckpt").exists()  # nothing was fetched
    finally:
        context.close()
        server.stop()
