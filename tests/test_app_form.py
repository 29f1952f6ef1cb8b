"""The form as data (no browser): values -> requests -> values, errors naming the form field,
the latent preview, and what the server imposes on every request."""
import pytest
import torch

from wan.app.form import KEEP, form_to_requests, parse_resolution, request_to_form
from wan.app.preview import latent_preview
from wan.engine.request import GenerationRequest, LoraChoice, RequestError

BASE = dict(model="test-tiny-t2v", task="t2v", prompt="a fox", resolution="96x64", frames=9.0, steps=4.0,
            guidance=5.0, shift=5.0, sampler="unipc", seed=-1.0, fps=16.0, quality=8)


def test_values_become_a_request_with_typed_fields():
    (req,) = form_to_requests(BASE)
    assert (req.width, req.height, req.frames, req.steps, req.seed) == (96, 64, 9, 4, -1)
    assert isinstance(req.frames, int) and req.profile_overrides == {} and req.loras == []
    (fixed,) = form_to_requests({**BASE, "seed": 42.0})
    assert fixed.seed == 42


def test_one_job_per_line_and_empty_prompt():
    reqs = form_to_requests({**BASE, "prompt": "a fox\n\n  a cat  \na dog", "one_per_line": True})
    assert [r.prompt for r in reqs] == ["a fox", "a cat", "a dog"]
    with pytest.raises(RequestError, match="prompt"):
        form_to_requests({**BASE, "prompt": "   "})


def test_step_saver_pickers_become_profile_overrides_only_when_set():
    values = {**BASE, "teacache": "on", "teacache_speedup": 2.5, "magcache": KEEP, "magcache_speedup": 9.0,
              "slg_mode": "uncond", "slg_layers": "8, 9", "cfg_skip_mode": "late", "cfg_skip_ratio": 0.6,
              "cfg_zero_star": "off", "overrides": "memory.offload=blocks\n# a comment\nmemory.pin=none"}
    (req,) = form_to_requests(values)
    assert req.profile_overrides == {
        "step_savers.teacache.enabled": True, "step_savers.teacache.speedup": 2.5,
        "step_savers.slg.mode": "uncond", "step_savers.slg.layers": [8, 9], "step_savers.cfg_skip.mode": "late",
        "step_savers.cfg_skip.ratio": 0.6, "step_savers.cfg_zero_star.enabled": False,
        "memory.offload": "blocks", "memory.pin": "none"}


def test_errors_name_the_form_field():
    cases = [({"resolution": "big"}, "resolution"), ({"frames": 9.5}, "frames"),
             ({"slg_mode": "uncond", "slg_layers": "nine"}, "slg_layers"), ({"overrides": "no equals"}, "overrides"),
             ({"loras": ["a.safetensors", "b.safetensors"], "lora_multipliers": "1.0"}, "lora_multipliers"),
             ({"teacache": "maybe"}, "teacache"), ({"model": ""}, "model")]
    for change, field in cases:
        with pytest.raises(RequestError) as e:
            form_to_requests({**BASE, **change})
        assert e.value.field == field, (change, e.value)


def test_a_request_goes_back_into_the_form_and_out_again_unchanged():
    req = GenerationRequest(model="test-tiny-t2v", prompt="round trip", task="t2v", width=64, height=64, frames=9,
                            steps=3, guidance=4.0, shift=3.0, sampler="euler", seed=77, negative_prompt="blurry",
                            fps=16, quality=7, profile="fast_preview", cpu_noise=True, trim_tail=2,
                            name_template="{seed}_{prompt}", save_latents=True, nag_scale=9.0, nag_tau=3.5,
                            nag_alpha=0.5, nag2_scale=1.0,
                            loras=[LoraChoice("test/a.safetensors", "1,0.5", include=["^blocks\\.0\\."]),
                                   LoraChoice("test/b.safetensors", "0.3")],
                            profile_overrides={"step_savers.teacache.enabled": True, "step_savers.teacache.speedup": 2.0,
                                               "memory.offload": "blocks", "step_savers.slg.mode": "original",
                                               "step_savers.slg.layers": [9, 10]})
    values = request_to_form(req, sizes=((64, 64), (96, 64)))
    assert values["resolution"] == "64x64" and values["teacache"] == "on" and values["slg_layers"] == "9 10"
    assert (values["nag_scale"], values["nag_tau"], values["nag_alpha"]) == (9.0, 3.5, 0.5)  # NAG has controls
    (again,) = form_to_requests(values)
    assert again == req  # every field, those without a control too (carried in "extra")
    two = GenerationRequest(model="test-tiny-t2v-a14b", prompt="experts", guidance_high_noise=4.0, boundary=0.9)
    assert form_to_requests(request_to_form(two))[0] == two
    custom = request_to_form(req.replace(width=128, height=32), sizes=((64, 64),))
    assert custom["resolution"] == "custom" and form_to_requests(custom)[0].width == 128


def test_parse_resolution():
    assert parse_resolution("832x480") == (832, 480) and parse_resolution("832 X 480") == (832, 480)
    with pytest.raises(RequestError, match="resolution"):
        parse_resolution("832*480")


def test_latent_preview_shows_the_main_directions_of_the_latent():
    torch.manual_seed(0)
    latent = torch.zeros(16, 3, 4, 6)
    latent[0, 1, :, :3] = 5.0  # left half bright on one channel, in the middle frame
    img = latent_preview(latent, scale=8)
    assert img.shape == (32, 48, 3) and img.dtype.name == "uint8"
    left, right = img[:, :24].astype(int), img[:, 24:].astype(int)
    assert (left.mean(axis=(0, 1)) - right.mean(axis=(0, 1))).__abs__().max() > 100  # the halves differ clearly
    assert (left.std(axis=(0, 1)) == 0).all() and (right.std(axis=(0, 1)) == 0).all()  # each half uniform


def test_the_server_moves_outputs_home_and_refuses_foreign_inputs(tmp_path):
    from wan.app.security import accept_request
    from wan.app.settings import ServerSettings
    from wan.app.state import AppState
    settings = ServerSettings(output_dir=str(tmp_path / "out"), state_dir=str(tmp_path / "state"), attention="sage",
                              compile=True, profile="fast_preview")
    state = AppState(settings, engine_factory=lambda: None)
    req = state.prepare(GenerationRequest(model="test-tiny-t2v", prompt="x", output_dir="/somewhere/else"))
    assert req.output_dir == str((tmp_path / "out").resolve()) and req.profile == "fast_preview"
    assert req.profile_overrides == {"attention": ["sage", "sdpa"], "compile": True}
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    with pytest.raises(RequestError, match="image"):
        state.prepare(GenerationRequest(model="test-tiny-i2v", prompt="x", task="i2v", image=str(outside)))
    with pytest.raises(RequestError, match="frames"):  # the limits apply to what the server accepts
        accept_request(GenerationRequest(model="test-tiny-t2v", prompt="x", frames=1001), state)


def test_the_page_builds_and_the_worker_starts_without_importing_torch(tmp_path):
    """Start-up stays light: torch and the networks load with the first job, not before."""
    import subprocess
    import sys
    code = f"""
import sys, time
from wan.app.settings import ServerSettings
from wan.app.state import AppState
from wan.app.server import build_app
state = AppState(ServerSettings(state_dir={str(tmp_path / 's')!r}, output_dir={str(tmp_path / 'o')!r}))
build_app(state)
state.queue.start()
time.sleep(0.5)
print('torch' in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_queue_progress_names_step_eta_and_expert():
    from wan.app.jobqueue import Job, JobProgress
    from wan.app.ui_queue import progress_text
    job = Job(id="j1", session="s", request={}, label="t2v: x", status="running")
    assert progress_text(job) == "loading models..."
    job.progress = JobProgress(step=3, total=20, expert="high_noise", eta_s=12.4, elapsed_s=5.0)
    assert progress_text(job) == "step 3/20 · high-noise expert · ETA 12 s"
    job.progress = JobProgress(step=5, total=20, expert="transformer", eta_s=3.0, elapsed_s=5.0)
    assert progress_text(job) == "step 5/20 · ETA 3 s"
    job.progress = JobProgress(step=2, total=4, expert="transformer", eta_s=3.0, elapsed_s=5.0, window=2, windows=3)
    assert progress_text(job) == "window 2/3 · step 2/4 · ETA 3 s"
    failed = Job(id="j2", session="s", request={}, label="x", status="failed", error="loras: 'a': no")
    assert progress_text(failed) == "loras: 'a': no"


def test_settings_from_a_file_keep_only_this_servers_inputs(tmp_path):
    from wan.app.settings import ServerSettings
    from wan.app.state import AppState
    state = AppState(ServerSettings(output_dir=str(tmp_path / "out"), state_dir=str(tmp_path / "state")),
                     engine_factory=lambda: None)
    ours = state.uploads_dir / "0123456789abcdef0123456789abcdef.png"
    ours.write_bytes(b"png")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"x")
    req = GenerationRequest(model="test-tiny-vace", prompt="x", task="vace", control_video=str(secret),
                            ref_images=[str(ours), "/etc/passwd"])
    kept, dropped = state.keep_own_inputs(req)
    assert kept.control_video is None and kept.ref_images == [str(ours)] and dropped == ["control_video", "ref_images"]
    assert state.keep_own_inputs(kept)[1] == []


def test_the_settings_tab_saves_changes_only_and_guards_an_exposed_server(tmp_path):
    import yaml

    from wan.app.settings import ServerSettings
    from wan.app.state import AppState
    from wan.app.ui_settings import changed_settings, save_changes
    config = tmp_path / "wan_studio.yaml"
    config.write_text("lora_dir: my_loras\n")
    local = AppState(ServerSettings(output_dir=str(tmp_path / "o"), state_dir=str(tmp_path / "s"), compile=True),
                     engine_factory=lambda: None)  # compile came from a flag at this start
    names = ["compile", "output_dir", "verbose"]
    changed = changed_settings(local, names, [True, str(tmp_path / "o"), True])
    assert changed == {"verbose": True}
    save_changes(local, changed, config)
    assert yaml.safe_load(config.read_text()) == {"lora_dir": "my_loras", "verbose": True}  # no flag persisted
    public = AppState(ServerSettings(output_dir=str(tmp_path / "o"), state_dir=str(tmp_path / "s"), share=True),
                      engine_factory=lambda: None)
    with pytest.raises(ValueError, match="output_dir: cannot be changed from the page"):
        changed_settings(public, names, [False, "/", False])
    assert changed_settings(public, names, [False, str(tmp_path / "o"), True]) == {"verbose": True}
