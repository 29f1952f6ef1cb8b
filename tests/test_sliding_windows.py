"""Sliding windows and video continuation (wan.engine.windows) on the TEST models: the plan of
windows, what each window is conditioned on (the tensors, not just the output), colour
correction, the seams, one window against the plain run, continuation, and refused settings."""

import math

import numpy as np
import pytest
import torch

from wan.engine import Engine, GenerationRequest, RequestError, request_from_metadata, resolve_request
from wan.engine.color_match import ColorStats, match_colors
from wan.engine.media import load_video, read_metadata
from wan.engine.window_plan import plan_windows, window_count, window_prompts
from wan.testing.tiny_family import ensure_tiny_checkpoints


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    return Engine(checkpoint_dir=root, device="cpu", dtype=torch.float32)


def frames_of(path) -> torch.Tensor:
    return load_video(path)[0]


# -- the plan ------------------------------------------------------------------------------------


@pytest.mark.parametrize("total,size,overlap,discard", [(17, 9, 4, 0), (81, 33, 5, 0), (161, 81, 5, 4),
                                                        (129, 81, 9, 8), (25, 9, 1, 0), (9, 9, 5, 0)])
def test_the_plan_covers_the_clip_in_wan2gp_s_window_count(total, size, overlap, discard):
    windows = plan_windows(total, size, overlap, discard, prompts=["a", "b"], seed=7)
    assert len(windows) == window_count(total, size, overlap, discard)
    if total > size:
        assert len(windows) == 1 + math.ceil((total - size + discard) / (size - discard - overlap))
    assert sum(w.new for w in windows) == total
    assert all((w.frames - 1) % 4 == 0 and w.frames <= size for w in windows)
    position = 0
    for w in windows:  # each window starts where its overlap reaches back to
        assert w.start == position - w.overlap and w.new >= 1
        position += w.new
    assert [w.seed for w in windows] == [7 + i for i in range(len(windows))]
    assert [w.prompt for w in windows] == ["a", "b", "b", "b", "b", "b"][:len(windows)]


def test_prompts_per_window():
    assert window_prompts("a fox\n\nthe fox sits", True) == ["a fox", "the fox sits"]
    assert window_prompts("a fox\nin snow", False) == ["a fox\nin snow"]  # one window: the prompt as it is
    assert window_prompts("a fox [/window] it sits\nstill", True) == ["a fox", "it sits\nstill"]


# -- three windows, overlap 4: frame count and the conditioning of each window ------------------------


def test_three_windows_overlap_4_are_conditioned_on_the_window_before(engine, tmp_path, monkeypatch):
    """VACE at 3 windows of 9 frames, overlap 4, 17 frames: the file has 17 frames; window k+1's
    kept latents and the first frames of its VACE control are the VAE latents of the last frames
    made before it (window k's decoded frames, cut seams), with a mask that keeps them."""
    from PIL import Image
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "ref.png")
    req = GenerationRequest(model="test-tiny-vace", prompt="a fox\nthe fox sits\nthe fox sleeps", frames=17,
                            sliding_window_size=9, sliding_window_overlap=4, seed=5, steps=2, width=16, height=16,
                            ref_images=[str(tmp_path / "ref.png")], output_dir=str(tmp_path / "out"))
    nets = engine.models.get(engine.registry.get(req.model))
    calls, decoded = spy_windows(engine, monkeypatch, nets.vae)
    seen = []
    result = engine.generate(req, progress=lambda s: seen.append((s.window, s.windows)))

    assert frames_of(result.files[0]).shape[1] == 17
    plan = result.metadata["windows"]
    assert [(w["start"], w["frames"], w["overlap"], w["new"]) for w in plan] == [(0, 9, 0, 9), (5, 9, 4, 5),
                                                                                  (8, 9, 6, 3)]
    assert [c[0].prompt for c in calls] == ["a fox", "the fox sits", "the fox sleeps"]
    assert [c[0].seed for c in calls] == [5, 6, 7]
    assert seen == [(1, 3)] * 2 + [(2, 3)] * 2 + [(3, 3)] * 2
    assert calls[0][1] is None  # window 1: the plain run of its 9 frames
    # the video as written: each window's frames after its overlap (cut seams)
    joined = torch.cat([d[:, w["overlap"]:] for d, w in zip(decoded, plan)], dim=1)
    assert joined.shape[1] == 17
    for k in (1, 2):  # window k+1 (index k)
        w = plan[k]
        before = joined[:, w["start"]:w["start"] + w["overlap"]]
        # made by window k: window 2 overlaps frames 5..8 of window 1; window 3 overlaps frame 8 of
        # window 1 and frames 9..13 of window 2
        assert torch.equal(before[:, -1], decoded[k - 1][:, -1])
        kept = 1 + (w["overlap"] - 1) // 4
        expected = nets.vae.encode(before[None, :, :1 + 4 * (kept - 1)])[0]
        cond = calls[k][1]
        assert cond.keep is not None and cond.keep.offset == 1  # after the reference image's latent frame
        torch.testing.assert_close(cond.keep.latent, expected)
        context = cond.dit_kwargs["vace_context"][0]  # [inactive 16, reactive 16, mask 64] x latent frames
        torch.testing.assert_close(context[:16, 1:1 + kept], expected, rtol=1e-4, atol=1e-4)
        assert torch.all(context[32:, 1:1 + kept] == 0)  # mask 0: these frames are kept
        assert torch.all(context[32:, -1] == 1)          # the rest is made
    meta = read_metadata(result.files[0])
    assert request_from_metadata(meta) == result.request  # --from_output rebuilds the whole run


def test_vace_overlap_noise_blends_fresh_noise_into_the_kept_control_latents_each_step(engine, tmp_path):
    """``sliding_window_overlap_noise`` 60 (Wan2GP's): before each step of window 2, the control's
    inactive latents at the overlap are ``0.94·latent + 0.06·noise`` with the step's own noise from the
    window's seed; nothing else of the control changes; the run repeats exactly; 0 is the plain run."""
    from PIL import Image
    from wan.engine.conditioning import OverlapNoise
    Image.new("RGB", (64, 64), (40, 200, 40)).save(tmp_path / "ref.png")
    req = GenerationRequest(model="test-tiny-vace", prompt="a fox", frames=13, sliding_window_size=9,
                            sliding_window_overlap=5, seed=5, steps=3, width=16, height=16,
                            ref_images=[str(tmp_path / "ref.png")])
    plain = engine.generate(req, write=False)
    dit = engine.models.current.dit
    seen, applied = [], []
    hook = dit.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["vace_context"][0].clone()),
                                         with_kwargs=True)
    apply = OverlapNoise.apply

    def record(self):
        applied.append(self)
        apply(self)
    try:
        OverlapNoise.apply = record
        noised = engine.generate(req.replace(sliding_window_overlap_noise=60), write=False)
    finally:
        OverlapNoise.apply = apply
        hook.remove()
    assert len(set(map(id, applied))) == 1 and len(applied) == 3  # window 2 alone, once per step
    state = applied[0]
    g = torch.Generator().manual_seed(6)  # window 2's seed: the run's + 1
    window2 = seen[len(seen) - 2 * 3:]  # its passes (guidance: prompt and negative prompt per step)
    for step in range(3):
        expected = 0.94 * state.latent + 0.06 * torch.randn(state.latent.shape, generator=g)
        for context in window2[2 * step:2 * step + 2]:  # latent frame 0: the reference image; 1, 2: the overlap
            torch.testing.assert_close(context[:16, 1:3], expected, rtol=0, atol=1e-6)
            assert torch.equal(context[16:], window2[0][16:]) and torch.equal(context[:16, 3:], window2[0][:16, 3:])
            assert torch.equal(context[:16, :1], window2[0][:16, :1])
    assert not torch.equal(window2[0][:16, 1:3], window2[2][:16, 1:3])  # fresh noise at each step
    assert torch.equal(engine.generate(req.replace(sliding_window_overlap_noise=60), write=False).video, noised.video)
    assert not torch.equal(noised.video, plain.video)
    assert torch.equal(engine.generate(req.replace(sliding_window_overlap_noise=0), write=False).video, plain.video)


def test_overlap_noise_on_a_task_without_control_latents_is_said_to_do_nothing(engine):
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", frames=13, sliding_window_size=9,
                            sliding_window_overlap=5, seed=5, steps=2, width=16, height=16)
    plain = engine.generate(req, write=False)
    result = engine.generate(req.replace(sliding_window_overlap_noise=20), write=False)
    assert torch.equal(result.video, plain.video)
    assert "sliding_window_overlap_noise 20: applies to VACE windows only; task t2v does not use it" in result.notices


def spy_windows(engine, monkeypatch, vae):
    """Records what each window's denoise was given, and each decoded window."""
    calls, decoded = [], []
    denoise, decode = Engine.denoise, type(vae).decode

    def spy_denoise(self, req_w, nets_, **kw):
        calls.append((req_w, kw.get("cond")))
        return denoise(self, req_w, nets_, **kw)

    def spy_decode(model, z, *a, **kw):
        out = decode(model, z, *a, **kw)
        decoded.append(out[0].clone())
        return out
    monkeypatch.setattr(Engine, "denoise", spy_denoise)
    monkeypatch.setattr(type(vae), "decode", spy_decode)
    return calls, decoded


def test_i2v_windows_start_from_the_last_frame_and_end_on_the_end_image(engine, tmp_path, monkeypatch):
    """i2v, overlap 1: window 2's known first frame (y mask and latents) and CLIP input are window
    1's last frame; the end image is known in the last window only."""
    from PIL import Image

    from wan.engine.conditioning import known_frames_mask, pil_to_tensor
    Image.new("RGB", (16, 16), (30, 160, 60)).save(tmp_path / "start.png")
    Image.new("RGB", (16, 16), (220, 200, 10)).save(tmp_path / "end.png")
    req = GenerationRequest(model="test-tiny-i2v", prompt="a fox", frames=17, sliding_window_size=9,
                            sliding_window_overlap=1, seed=4, steps=2, width=16, height=16,
                            image=str(tmp_path / "start.png"), end_image=str(tmp_path / "end.png"))
    nets = engine.models.get(engine.registry.get(req.model))
    calls, decoded = spy_windows(engine, monkeypatch, nets.vae)
    result = engine.generate(req, write=False)
    assert result.video.shape[1] == 17 and [w["frames"] for w in result.metadata["windows"]] == [9, 9]
    first, second = calls[0][1], calls[1][1]
    assert torch.all(first.dit_kwargs["y"][0, :4, -1] == 0)   # no end image in window 1
    assert torch.equal(second.dit_kwargs["y"][0, :4], known_frames_mask(9, 2, 2, True, True))
    before, end = decoded[0][:, -1], pil_to_tensor(Image.open(tmp_path / "end.png"))
    video = torch.zeros(3, 9, 16, 16)
    video[:, 0], video[:, -1] = before, end
    torch.testing.assert_close(second.dit_kwargs["y"][0, 4:], nets.vae.encode(video[None])[0])
    torch.testing.assert_close(second.dit_kwargs["clip_fea"][0], nets.clip(torch.stack([before, end])).reshape(-1, 160))
    torch.testing.assert_close(second.keep.latent, nets.vae.encode(before[None, :, None])[0])


def test_fun_control_windows_read_their_part_of_the_control_video(engine, tmp_path, monkeypatch):
    from wan.engine.media import write_video
    clip = smooth_clip_frames(17)
    write_video(clip, 16, tmp_path / "control.mp4")
    req = GenerationRequest(model="test-tiny-fun-control", prompt="a fox", frames=17, sliding_window_size=9,
                            sliding_window_overlap=4, seed=4, steps=2, width=16, height=16,
                            control_video=str(tmp_path / "control.mp4"))
    nets = engine.models.get(engine.registry.get(req.model))
    calls, _ = spy_windows(engine, monkeypatch, nets.vae)
    result = engine.generate(req, write=False)
    control = load_video(tmp_path / "control.mp4")[0]
    from wan.engine.conditioning import resize
    for (req_w, cond), w in zip(calls[1:], result.metadata["windows"][1:]):
        part = resize(control[:, w["start"]:w["start"] + w["frames"]], 16, 16)
        torch.testing.assert_close(cond.dit_kwargs["y"][0, :16], nets.vae.encode(part[None])[0], rtol=1e-4, atol=1e-4)
        assert cond.keep is not None


def test_the_form_takes_the_window_settings_and_shows_the_duration(tmp_path):
    from wan.app.form import form_to_requests, request_to_form
    from wan.app.ui_generate import duration_text
    values = {"model": "test-tiny-t2v", "prompt": "a\nb", "frames": 241.0, "sliding_window_size": 81.0,
              "sliding_window_overlap": 5.0, "sliding_window_seam": "crossfade", "continue_video": "/x/earlier.mp4",
              "sliding_window_color_correction": "histogram", "sliding_window_color_correction_strength": 0.5,
              "sliding_window_overlap_noise": 20.0}
    (req,) = form_to_requests(values)
    assert (req.sliding_window_size, req.sliding_window_overlap, req.sliding_window_seam, req.continue_video) == (
        81, 5, "crossfade", "/x/earlier.mp4")
    assert req.sliding_window_overlap_noise == 20 and type(req.sliding_window_overlap_noise) is int
    assert request_to_form(req)["sliding_window_color_correction"] == "histogram"
    assert duration_text(241, 16, 81, 5, 0) == "241 frames at 16 fps = 15.06 s · 4 windows of up to 81 frames"
    source = smooth_clip(tmp_path / "earlier.mp4")
    assert duration_text(9, 16, 0, 5, 0, str(source)).endswith("after the 11 frames continued: 20 frames = 1.25 s in all")


@pytest.mark.parametrize("model,changes", [
    ("test-tiny-t2v", dict(sliding_window_seam="crossfade", sliding_window_discard_last_frames=1,
                           sliding_window_color_correction="histogram", sliding_window_color_correction_strength=1.0)),
    ("test-tiny-ti2v", dict(width=32, height=32, sliding_window_overlap=5)),
    ("test-tiny-t2v", dict(task="v2v", strength=0.8, sliding_window_color_correction_strength=0.5)),
])
def test_every_kind_of_window_runs_to_the_clip_s_length(engine, tmp_path, model, changes):
    from wan.engine.media import write_video
    write_video(smooth_clip_frames(17), 16, tmp_path / "input.mp4")
    req = GenerationRequest(**{"model": model, "prompt": "a fox [/window] a fox sits", "frames": 17, "seed": 4,
                               "sliding_window_size": 9, "sliding_window_overlap": 4, "steps": 2, "width": 16,
                               "height": 16, **changes})
    if req.task == "v2v":
        req = req.replace(video=str(tmp_path / "input.mp4"))
    result = engine.generate(req, write=False)
    assert result.video.shape[1] == 17 and len(result.metadata["windows"]) >= 3
    assert sum(w["new"] for w in result.metadata["windows"]) == 17
    assert torch.isfinite(result.video).all()


def test_the_flags_have_wan2gp_s_names():
    from tests.test_request_fields import parse
    req = parse("--model", "m", "--frames", "241", "--sliding_window_size", "81", "--sliding_window_overlap", "5",
                "--sliding_window_discard_last_frames", "4", "--sliding_window_color_correction_strength", "0.7",
                "--sliding_window_seam", "crossfade", "--continue_video", "earlier.mp4",
                "--sliding_window_overlap_noise", "20")
    assert (req.sliding_window_size, req.sliding_window_overlap, req.sliding_window_discard_last_frames,
            req.sliding_window_color_correction_strength, req.sliding_window_seam, req.continue_video,
            req.sliding_window_overlap_noise) == (81, 5, 4, 0.7, "crossfade", "earlier.mp4", 20)


def test_a_cancel_between_windows_leaves_no_file(engine, tmp_path):
    from wan.engine import Cancelled, CancelToken
    token = CancelToken()

    def progress(info):
        if info.window == 2:
            token.cancel()
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", frames=17, sliding_window_size=9, seed=1, steps=2,
                            width=16, height=16, output_dir=str(tmp_path / "out"))
    with pytest.raises(Cancelled):
        engine.generate(req, progress=progress, cancel=token)
    assert not any((tmp_path / "out").iterdir())  # not even a temp file of the stream


# -- colour correction -----------------------------------------------------------------------------


def drifting_windows(count: int = 5):
    """A textured clip and copies of it whose brightness, contrast and tint drift window by window."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 9, 8, 8, generator=g), size=(9, 48, 48),
                                           mode="trilinear")[0] * 1.2 - 0.6
    out = []
    for k in range(1, count + 1):
        tint = torch.tensor([0.04, -0.02, 0.03]).view(3, 1, 1, 1) * k
        out.append(((base - base.mean()) * (1 + 0.08 * k) + base.mean() + tint).clamp(-1, 1))
    return base, out


def drift(video, reference) -> float:
    """Largest per-channel distance of the mean plus that of the standard deviation, in RGB."""
    dims = (1, 2, 3)
    return float((video.mean(dims) - reference.mean(dims)).abs().max()
                 + (video.std(dims) - reference.std(dims)).abs().max())


@pytest.mark.parametrize("mode", ["mean_std", "histogram"])
def test_colour_correction_removes_most_of_a_synthetic_drift(mode):
    """Windows drifting up to 0.31 (mean + std distance in RGB) end within a fifth of it (measured:
    about 8x smaller with mean_std, 10x with histogram); half strength removes about half."""
    reference, windows = drifting_windows()
    stats = ColorStats.of(reference)
    for window in windows:
        before = drift(window, reference)
        assert drift(match_colors(window, stats, mode, 1.0), reference) < before / 5
        half = drift(match_colors(window, stats, mode, 0.5), reference)
        assert before * 0.4 < half < before * 0.65
    assert match_colors(windows[0], stats, "off", 1.0) is windows[0]


def test_crossfade_blends_the_overlap_linearly():
    from wan.engine.windows import _Timeline
    sent = []
    out = type("Out", (), {"emit": lambda self, f: sent.append(f.clone()), "emit_uint8": lambda *a: None})()
    line = _Timeline(out, keep=6)
    first, second = torch.zeros(3, 9, 2, 2), torch.ones(3, 9, 2, 2)
    line.join(first, 0, crossfade=True, hold=3)      # the last 3 frames wait for the next window
    line.join(second, 3, crossfade=True, hold=0)     # its 3 first frames blend into them
    video = torch.cat(sent, dim=1)
    assert video.shape[1] == 9 + 6
    assert torch.allclose(video[0, 6:9, 0, 0], torch.tensor([0.25, 0.5, 0.75]))
    assert torch.all(video[:, :6] == 0) and torch.all(video[:, 9:] == 1)


# -- one window is the plain run ---------------------------------------------------------------------


def test_one_window_reproduces_the_plain_run_exactly(engine, tmp_path):
    plain = GenerationRequest(model="test-tiny-t2v", prompt="a fox\nin the snow", frames=9, seed=11, width=32,
                              height=32, output_dir=str(tmp_path / "plain"))
    a = engine.generate(plain)
    b = engine.generate(plain.replace(sliding_window_size=9, sliding_window_overlap=4, output_dir=str(tmp_path / "w")))
    assert torch.equal(a.latent, b.latent) and torch.equal(a.video, b.video)
    assert torch.equal(frames_of(a.files[0]), frames_of(b.files[0]))
    assert b.metadata["windows"] == [{"window": 1, "start": 0, "frames": 9, "overlap": 0, "discard": 0, "new": 9,
                                      "prompt": "a fox\nin the snow", "seed": 11}]


# -- continuation ---------------------------------------------------------------------------------------


def smooth_clip_frames(frames: int = 11) -> np.ndarray:
    """A soft gradient sliding to the right, [T, 32, 32, 3] uint8."""
    y, x = np.mgrid[0:32, 0:32] * 2
    clip = np.stack([np.stack([(x + 3 * t) * 2, y * 3, 255 - (x + y + 2 * t)], axis=-1) for t in range(frames)])
    return np.clip(clip, 0, 255).astype(np.uint8)


def smooth_clip(path):
    """An upload of :func:`smooth_clip_frames` (H.264, as a phone would send it)."""
    from wan.engine.media import write_video
    return write_video(smooth_clip_frames(), 16, path)


def test_continuation_starts_with_the_input_video_and_names_it(engine, tmp_path):
    raw = torch.from_numpy(smooth_clip_frames()).permute(3, 0, 1, 2).float() / 127.5 - 1
    source = smooth_clip(tmp_path / "upload.mp4")
    more = GenerationRequest(model="test-tiny-t2v", prompt="the fox runs", frames=9, seed=3, continue_video=str(source),
                             sliding_window_overlap=5, width=32, height=32, output_dir=str(tmp_path / "out"))
    result = engine.generate(more)
    given, made = frames_of(source), frames_of(result.files[0])
    assert made.shape[1] == 11 + 9
    # in 8-bit steps: the copy is one more H.264 pass over the upload's frames, which differ from
    # what was uploaded by about as much
    codec = (given - raw).abs().mean() * 127.5
    error = (made[:, :11] - given).abs() * 127.5
    assert error.mean() <= codec and error.max() <= 8, (error.mean(), codec, error.max())
    meta = read_metadata(result.files[0])
    assert meta["request"]["continue_video"] == str(source)
    assert meta["continued_from"] == {"path": str(source), "frames": 11}
    assert request_from_metadata(meta) == result.request
    (w,) = meta["windows"]  # one window: the last frames of the upload, then the 9 new ones
    assert (w["start"], w["new"]) == (11 - w["overlap"], 9) and 5 <= w["overlap"] <= 8


# -- refused settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,field,words", [
    (dict(sliding_window_size=9, sliding_window_overlap=9), "sliding_window_overlap", "fewer frames than the window"),
    (dict(sliding_window_size=10), "sliding_window_size", "4k+1"),
    (dict(sliding_window_size=9, sliding_window_overlap=0), "sliding_window_overlap", "at least 1"),
    (dict(sliding_window_size=9, sliding_window_overlap=4, sliding_window_discard_last_frames=5),
     "sliding_window_discard_last_frames", "at most 4"),
    (dict(sliding_window_seam="fade"), "sliding_window_seam", "cut, crossfade"),
    (dict(sliding_window_color_correction="auto"), "sliding_window_color_correction", "off, mean_std, histogram"),
    (dict(sliding_window_color_correction_strength=1.5), "sliding_window_color_correction_strength", "0 (off) to 1"),
    (dict(sliding_window_overlap_noise=151), "sliding_window_overlap_noise", "0 (off) to 150"),
    (dict(sliding_window_overlap_noise=-1), "sliding_window_overlap_noise", "0 (off) to 150"),
    (dict(sliding_window_size=9, frames=17, prompt="a\nb\nc\nd"), "prompt", "4 prompts"),
    (dict(prompt="a [/window] b"), "prompt", "--sliding_window_size"),
    (dict(sliding_window_size=9, frames=17, save_latents=True), "save_latents", "window by window"),
    (dict(task="t2i", frames=1, sliding_window_size=9, continue_video="x.mp4"), "continue_video", "t2i takes"),
    (dict(task="v2v", video="in.mp4", continue_video="x.mp4"), "continue_video", "v2v takes"),
])
def test_bad_window_settings_are_refused_with_the_reason(changes, field, words):
    req = GenerationRequest(**{"model": "test-tiny-t2v", "prompt": "a fox", "frames": 9, "seed": 1, **changes})
    with pytest.raises(RequestError) as e:
        resolve_request(req, check_files=False)
    assert e.value.field == field and words in str(e.value), str(e.value)


def test_a_continued_i2v_clip_needs_no_start_image_and_refuses_one():
    base = GenerationRequest(model="test-tiny-i2v", prompt="a fox", frames=9, seed=1, continue_video="x.mp4")
    resolved, _ = resolve_request(base, check_files=False)
    assert resolved.continue_video == "x.mp4"
    with pytest.raises(RequestError, match="no start image"):
        resolve_request(base.replace(image="s.png"), check_files=False)
    assert np.isclose(resolved.sliding_window_color_correction_strength, 0.0)
