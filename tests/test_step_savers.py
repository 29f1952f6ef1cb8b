"""Step savers: CFG skipping, skip-layer guidance, CFG-Zero*, TeaCache, batched CFG."""

import numpy as np
import pytest
import torch

from wan.engine import Engine, GenerationRequest
from wan.optim.step_savers import StepSavers
from wan.optim.guidance import (GuidanceSettings, SkipLayerGuidance, StepGuidance, cfg_apply_pattern,
                                cfg_zero_star_alpha)
from wan.optim.step_cache import calibrate_teacache, teacache_schedule
from wan.testing.tiny_family import ensure_tiny_checkpoints


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    return Engine(checkpoint_dir=root, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("mode,pattern", [
    ("early", "SSSSAAAAAA"), ("late", "AAAAAASSSS"), ("middle", "AAASSSSAAA"),
    ("early_late", "SSAAAAAASS"), ("alternate", "SASASAASAS"), ("none", "AAAAAAAAAA"),
])
def test_cfg_skip_patterns(mode, pattern):
    assert "".join("A" if a else "S" for a in cfg_apply_pattern(mode, 0.6, 10)) == pattern


def test_cfg_skip_runs_one_pass_on_skipped_steps(engine):
    seen = []
    engine.generate(GenerationRequest(model="test-tiny-t2v", prompt="x", steps=5, seed=1), write=False,
                    progress=lambda s: seen.append(s.passes),
                    savers=StepSavers(GuidanceSettings(cfg_skip_mode="early", cfg_skip_ratio=0.6)))
    assert seen == [("cond",)] * 2 + [("cond", "uncond")] * 3


def test_slg_blocks_run_in_each_pass_and_step(engine):
    """Skip-layer guidance, SD3.5 mode, layer 1 of 2, active for steps int(0.25*4)..int(0.75*4)-1."""
    nets = engine.models.get(engine.registry.get("test-tiny-t2v"))
    dit = nets.dit
    log = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: log.append((dit.block_runner.step,
                                                                       dit.block_runner.pass_name, i)))
             for i, b in enumerate(dit.blocks)]
    slg = SkipLayerGuidance(mode="original", layers=(1,), scale=2.0, start=0.25, end=0.75)
    try:
        engine.generate(GenerationRequest(model="test-tiny-t2v", prompt="x", steps=4, seed=1), write=False,
                        savers=StepSavers(GuidanceSettings(slg=slg)))
    finally:
        for h in hooks:
            h.remove()
    expected = []
    for step in range(4):
        passes = ["cond", "uncond"] + (["cond_skip"] if step in (1, 2) else [])
        for p in passes:
            expected += [(step, f"transformer/{p}", b) for b in (0, 1) if not (p == "cond_skip" and b == 1)]
    assert log == expected
    assert dit.block_runner is None  # removed after the generation


def test_guidance_combinations_by_hand():
    g = torch.Generator().manual_seed(0)
    cond, uncond, skip = (torch.randn(4, 3, 2, 2, generator=g) for _ in range(3))
    plain = StepGuidance(GuidanceSettings(), 10).combine(0, {"cond": cond, "uncond": uncond}, 5.0, cond)
    assert torch.allclose(plain, uncond + 5.0 * (cond - uncond))
    slg = StepGuidance(GuidanceSettings(slg=SkipLayerGuidance(mode="original", scale=3.0)), 10)
    out = slg.combine(5, {"cond": cond, "uncond": uncond, "cond_skip": skip}, 5.0, cond)
    assert torch.allclose(out, uncond + 5.0 * (cond - uncond) + 3.0 * (cond - skip))
    wan2gp = StepGuidance(GuidanceSettings(slg=SkipLayerGuidance(mode="uncond")), 10)
    assert wan2gp.passes(5, 5.0) == ("cond", "uncond_skip")
    assert torch.allclose(wan2gp.combine(5, {"cond": cond, "uncond_skip": skip}, 5.0, cond), skip + 5.0 * (cond - skip))


def test_cfg_zero_star_scale_and_zero_init_by_hand():
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(16, 2, 4, 4, generator=g), torch.randn(16, 2, 4, 4, generator=g)
    c, u = cond.double().numpy().ravel(), uncond.double().numpy().ravel()
    alpha = (c @ u) / (u @ u + 1e-8)
    assert cfg_zero_star_alpha(cond[None], uncond[None]).item() == pytest.approx(alpha, rel=1e-5)
    z = StepGuidance(GuidanceSettings(cfg_zero_star=True, zero_init_steps=2), 10)
    assert z.passes(0, 5.0) == () and z.passes(1, 5.0) == () and z.passes(2, 5.0) == ("cond", "uncond")
    assert torch.equal(z.combine(0, {}, 5.0, cond), torch.zeros_like(cond))
    expected = alpha * u + 5.0 * (c - alpha * u)
    got = z.combine(3, {"cond": cond, "uncond": uncond}, 5.0, cond).double().numpy().ravel()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_teacache_threshold_zero_is_exactly_uncached(engine):
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=6, seed=2)
    plain = engine.generate(req, write=False)
    cached = engine.generate(req, write=False, savers=StepSavers(teacache_threshold=0.0))
    assert torch.equal(plain.latent, cached.latent)


def test_teacache_speedup_computes_the_target_number_of_steps(engine):
    steps, speedup = 20, 2.0
    nets = engine.models.get(engine.registry.get("test-tiny-t2v"))
    from wan.engine.samplers import make_sampler
    from wan.optim.step_cache import time_embeddings
    emb = time_embeddings(nets.dit, make_sampler("unipc", steps, 5.0).timesteps)
    threshold, schedule = calibrate_teacache(emb, speedup, start_steps=2)
    assert schedule[0] and schedule[1] and schedule[-1]  # first steps and the last are computed
    assert abs(sum(schedule) - steps / speedup) <= 1
    assert teacache_schedule(emb, threshold, start_steps=2) == schedule

    runs = []
    dit = nets.dit
    hook = dit.blocks[0].register_forward_hook(lambda m, a, o: runs.append(dit.block_runner.step))
    try:
        result = engine.generate(GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=steps, seed=3),
                                 write=False, savers=StepSavers(teacache_speedup=speedup, teacache_start=0.1))
    finally:
        hook.remove()
    computed_steps = sorted(set(runs))
    assert len(computed_steps) == sum(schedule)  # both passes computed exactly on the scheduled steps
    assert len(runs) == 2 * sum(schedule)
    assert torch.isfinite(result.latent).all()


def test_batched_cfg_matches_separate_passes(engine):
    req = GenerationRequest(model="test-tiny-i2v", prompt="a much longer prompt than the negative one", steps=3,
                            seed=4, negative_prompt="blur")
    from PIL import Image
    import tempfile
    path = tempfile.mktemp(suffix=".png")
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    req = req.replace(image=path)
    separate = engine.generate(req, write=False)
    batched = engine.generate(req, write=False, savers=StepSavers(batched_cfg=True))
    err = ((separate.latent - batched.latent).abs().max() / separate.latent.abs().max()).item()
    assert err <= 1e-5


def test_riflex_changes_only_the_kth_frame_frequency():
    from wan.models.dit import rope_angles
    cos, sin = rope_angles((21, 2, 2), 128)
    cos_r, sin_r = rope_angles((21, 2, 2), 128, riflex=(6, 21))
    changed = ((cos - cos_r).abs() > 0).any(0) | ((sin - sin_r).abs() > 0).any(0)
    assert changed.nonzero().flatten().tolist() == [5]  # frame frequencies are pairs 0..21; k=6 is pair 5
    positions = torch.arange(21).repeat_interleave(4).double()
    assert torch.allclose(cos_r[:, 5].double(), torch.cos(positions * 0.9 * 2 * np.pi / 21), atol=1e-6)


def test_riflex_auto_turns_on_for_long_clips_only(engine):
    s = StepSavers()
    assert s.riflex_setting(21, 81, 16) is None and s.riflex_setting(31, 121, 16) == (6, 31)
    assert StepSavers(riflex="on").riflex_setting(3, 9, 16) == (6, 3)
    req = GenerationRequest(model="test-tiny-t2v", prompt="x", steps=2, seed=1)
    plain = engine.generate(req, write=False)
    assert torch.equal(plain.latent, engine.generate(req, write=False, savers=StepSavers(riflex="off")).latent)
    on = engine.generate(req, write=False, savers=StepSavers(riflex="on"))
    assert not torch.equal(plain.latent, on.latent)
    assert engine.models.current.dit.riflex is None  # reset after the generation


def test_magcache_schedule_rules():
    from wan.optim.step_cache import calibrate_magcache, magcache_schedule
    ratios = [1.0] + [0.99] * 19
    assert magcache_schedule(ratios, 0.0) == [True] * 20
    sched = magcache_schedule(ratios, 10.0, max_skips=2, start_steps=4)
    assert sched[:4] == [True] * 4 and sched[-1]
    assert "FFF" not in "".join("T" if c else "F" for c in sched)  # never more than 2 skips in a row
    _, best = calibrate_magcache(ratios, 2.0, max_skips=2, start_steps=2)
    assert abs(sum(best) - 10) <= 1


def test_magcache_calibrated_on_the_model_then_threshold_zero_is_exact(engine):
    from wan.optim.step_cache import MagnitudeRecorder
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=8, seed=5)
    dit = engine.models.get(engine.registry.get(req.model)).dit
    rec = MagnitudeRecorder()
    dit.block_runner = rec

    class Recording(StepSavers):  # the loop's runner hook returns our recorder
        def runner(self, networks, sampler, start):
            return rec
    try:
        plain = engine.generate(req, write=False, savers=Recording())
    finally:
        dit.block_runner = None
    ratios = rec.ratios("transformer/cond")
    assert len(ratios) == 8 and all(r > 0 for r in ratios)
    exact = engine.generate(req, write=False, savers=StepSavers(magcache_ratios=tuple(ratios), magcache_threshold=0.0))
    assert torch.equal(exact.latent, plain.latent)
    fast = engine.generate(req, write=False, savers=StepSavers(magcache_ratios=tuple(ratios), magcache_speedup=2.0,
                                                               magcache_start=0.25))
    assert torch.isfinite(fast.latent).all()


def test_a_profile_switches_savers_on_through_the_engine(engine):
    """The fast_preview profile's savers run (fewer passes than plain); a per-job override turns
    one off again; both give finite latents."""
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=10, seed=6)
    plain, fast = [], []
    engine.generate(req, write=False, progress=lambda s: plain.append(len(s.passes)))
    engine.generate(req.replace(profile="fast_preview"), write=False, progress=lambda s: fast.append(len(s.passes)))
    assert sum(fast) < sum(plain)
    off = []
    engine.generate(req.replace(profile="fast_preview", profile_overrides={"step_savers.cfg_skip.mode": "none"}),
                    write=False, progress=lambda s: off.append(len(s.passes)))
    assert sum(off) == sum(plain)


def test_profile_attention_preference_falls_back_with_a_notice_on_cpu(engine):
    result = engine.generate(GenerationRequest(model="test-tiny-t2v", prompt="x", steps=1, profile="fast_preview"),
                             write=False)
    assert any("sdpa" in n for n in result.notices)
    plain = engine.generate(GenerationRequest(model="test-tiny-t2v", prompt="x", steps=1), write=False)
    assert [n for n in plain.notices if not n.startswith("text encoder:")] == []  # the text cache may speak


def test_lowest_memory_profile_streams_and_gives_the_same_frames(engine):
    """Profile 5 streams the transformer from its checkpoint: the frames equal those of the same
    profile with the transformer loaded whole (both quantise the text encoder the same way)."""
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=3, seed=8, profile="5")
    streamed = engine.generate(req, write=False)
    assert any("streamed block by block" in n for n in streamed.notices)
    assert len(engine.models.current.handles) == 1
    whole = engine.generate(req.replace(profile_overrides={"memory.offload": "none"}), write=False)
    assert not engine.models.current.handles  # a profile with other load settings reloaded the model
    assert torch.equal(streamed.video, whole.video)
    assert any("int8" in n for n in streamed.notices)


def test_profile_quantising_the_transformer_stays_close(engine):
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=3, seed=9)
    plain = engine.generate(req, write=False)
    q = engine.generate(req.replace(profile="quality", profile_overrides={"quantize.transformer": "int8"}), write=False)
    assert any("transformer" in n and "int8" in n for n in q.notices)
    err = ((q.latent - plain.latent).abs().max() / plain.latent.abs().max()).item()
    assert 0 < err < 0.05  # int8 weights with per-row scales: about 1% on this tiny model


def test_profile_compile_compiles_the_blocks_and_keeps_the_output(engine):
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=2, seed=10)
    plain = engine.generate(req, write=False)
    compiled = engine.generate(req.replace(profile="quality", profile_overrides={"compile": True}), write=False)
    assert any("blocks compiled" in n for n in compiled.notices)
    assert ((compiled.latent - plain.latent).abs().max() / plain.latent.abs().max()).item() <= 1e-4


def test_compile_is_left_off_for_bf16_blocks_on_the_cpu(engine):
    """Inductor's CPU code gave NaN in every output of compiled bf16 blocks: the engine says so and
    runs them eagerly (float32 blocks compile: the test above)."""
    from wan.optim.compile import compile_refusal
    assert compile_refusal("cpu", torch.float32) is None and compile_refusal("cuda", torch.bfloat16) is None
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=2, seed=10,
                            profile="quality", profile_overrides={"precision": "bf16"})
    eager = engine.generate(req, write=False)
    refused = engine.generate(req.replace(profile_overrides={"precision": "bf16", "compile": True}), write=False)
    assert any("torch.compile left off: on the CPU its bfloat16 code gave NaN" in n for n in refused.notices)
    assert not any("blocks compiled" in n for n in refused.notices)
    assert torch.equal(refused.latent, eager.latent)


def test_profile_precision_and_vae_tiling_take_effect(engine):
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=2, seed=11)
    plain = engine.generate(req, write=False)
    bf16 = engine.generate(req.replace(profile="quality", profile_overrides={"precision": "bf16"}), write=False)
    assert engine.models.current.dit.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert not torch.equal(plain.latent, bf16.latent)
    tiled = engine.generate(req.replace(profile="quality", profile_overrides={"vae.tiling": "on", "vae.tile_px": 32,
                                                                               "vae.overlap_px": 16}), write=False)
    assert torch.equal(plain.latent, tiled.latent)      # tiling changes only the decode
    assert not torch.equal(plain.video, tiled.video)
    from wan.engine.engine import vae_tiling
    from wan.optim.apply import resolve_profile
    assert vae_tiling(resolve_profile("quality"), (832, 480)) is None
    assert vae_tiling(resolve_profile("quality"), (1920, 1088)) is not None
