"""Engine behaviour on the TEST family: expert switching, cancel, seeds."""

import numpy as np
import pytest
import torch

from wan.engine import Cancelled, CancelToken, Engine, GenerationRequest
from wan.testing.tiny_family import ensure_tiny_checkpoints


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    return Engine(checkpoint_dir=root, device="cpu", dtype=torch.float32)


def reference_timesteps(steps: int, shift: float) -> list[int]:
    """The official UniPC grid, computed here independently of the engine's sampler. It starts at
    float32(0.999), as the official scheduler reads its first sigma back from a float32 table."""
    sigma = np.linspace(float(np.float32(0.999)), 0, steps + 1)[:-1]
    shifted = shift * sigma / (1 + (shift - 1) * sigma)
    return [int(s * 1000) for s in shifted]


def test_a14b_expert_and_guidance_at_each_step(engine):
    steps, boundary, shift = 8, 0.9, 12.0
    req = GenerationRequest(model="test-tiny-t2v-a14b", prompt="x", steps=steps, boundary=boundary, shift=shift,
                            guidance=3.0, guidance_high_noise=4.5, seed=1)
    nets = engine.models.get(engine.registry.get(req.model))
    calls = []
    hooks = [dit.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
             for name, dit in nets.dits.items()]
    try:
        result = engine.generate(req, write=False)
    finally:
        for h in hooks:
            h.remove()
    ts = reference_timesteps(steps, shift)
    expected = [("high_noise", 4.5) if t >= boundary * 1000 else ("low_noise", 3.0) for t in ts]
    assert [(s.expert, s.guidance) for s in result.steps] == expected
    assert [s.timestep for s in result.steps] == ts
    assert {e for e, _ in expected} == {"high_noise", "low_noise"}  # the switch happens inside the run
    # the network that ran is the one named: two passes (prompt, negative prompt) per step
    assert calls == [e for e, _ in expected for _ in range(2)]


def test_cancel_stops_within_one_step_and_writes_nothing(engine, tmp_path):
    token = CancelToken()
    seen = []

    def progress(info):
        seen.append(info.step)
        if info.step == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        engine.generate(GenerationRequest(model="test-tiny-t2v", prompt="x", steps=6, output_dir=str(tmp_path / "out")),
                        progress=progress, cancel=token)
    assert seen == [1, 2]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_same_seed_is_bit_identical_and_seeds_matter(engine):
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", seed=123)
    a = engine.generate(req, write=False)
    b = engine.generate(req, write=False)
    c = engine.generate(req.replace(seed=124), write=False)
    assert torch.equal(a.latent, b.latent) and torch.equal(a.video, b.video)
    assert not torch.equal(a.latent, c.latent)


def test_random_seed_is_recorded_and_reproduces(engine):
    first = engine.generate(GenerationRequest(model="test-tiny-t2v", prompt="a fox", seed=-1), write=False)
    assert 0 <= first.request.seed < 2**32
    again = engine.generate(first.request, write=False)
    assert torch.equal(first.latent, again.latent)


def test_noise_is_one_randn_of_the_latent_shape(engine):
    """As the official scripts: torch.randn([C, F', H', W']) from a generator seeded with the seed."""
    from wan.engine import draw_noise
    g = torch.Generator().manual_seed(77)
    assert torch.equal(draw_noise((16, 3, 8, 8), 77, torch.device("cpu")), torch.randn(16, 3, 8, 8, generator=g))


@pytest.mark.parametrize("sampler", ["dpm++", "euler"])
def test_other_samplers_run_and_differ(engine, sampler):
    base = GenerationRequest(model="test-tiny-t2v", prompt="a fox", seed=3, steps=4)
    unipc = engine.generate(base, write=False)
    other = engine.generate(base.replace(sampler=sampler), write=False)
    assert torch.isfinite(other.latent).all() and not torch.equal(other.latent, unipc.latent)


def test_choosing_another_model_releases_the_previous_one(engine):
    import gc
    import weakref
    engine.generate(GenerationRequest(model="test-tiny-t2v", prompt="x", steps=1), write=False)
    old = weakref.ref(engine.models.current.dit)
    engine.generate(GenerationRequest(model="test-tiny-ti2v", prompt="x", steps=1), write=False)
    gc.collect()
    assert engine.models.current.spec.id == "test-tiny-ti2v"
    assert old() is None  # nothing holds the previous DiT any more


def test_model_manager_keeps_fp8_files_and_quantises_others(tmp_path):
    from safetensors.torch import save_file
    from wan.engine.model_manager import ModelManager
    from wan.layers.quant import QuantLinear
    from wan.testing.tiny_family import tiny_dit_state_dict
    state = tiny_dit_state_dict("t2v", seed=1)
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 and k.startswith("blocks.") else v) for k, v in state.items()}
    save_file(fp8, tmp_path / "fp8.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / "bf16.safetensors")
    manager = ModelManager(device="cpu", dtype=torch.float32)
    notes = []
    kept, _ = manager._load_dit(tmp_path / "fp8.safetensors", torch.bfloat16, False, 1, None, "fp8", notes)
    assert "kept quantised" in notes[-1] and isinstance(kept.blocks[0].ffn[0], QuantLinear)
    converted, _ = manager._load_dit(tmp_path / "bf16.safetensors", torch.bfloat16, False, 1, None, "fp8", notes)
    assert notes[-1].startswith("transformer: fp8: ") and "linear layers" in notes[-1] and "bound method" not in notes[-1]
    assert isinstance(converted.blocks[0].ffn[0], QuantLinear)


def test_on_cuda_with_mmgp_the_profile_becomes_mmgp_settings(tmp_path, monkeypatch):
    """The CUDA path's logic, checked on the CPU: with CUDA and mmgp present (faked), models load
    into RAM and are handed to mmgp with the profile's budgets and pinning."""
    import importlib.util
    from wan.engine.model_manager import ModelManager
    from wan.optim import mmgp_backend
    from wan.optim.apply import mmgp_settings_from_profile, resolve_profile
    from wan.registry import get_model
    p4 = resolve_profile("4")
    s = mmgp_settings_from_profile(p4, ["transformer", "text_encoder", "vae"])
    assert s.budgets_mb == {"transformer": 100, "*": 3000} and s.pinned == ("transformer",)
    assert mmgp_settings_from_profile(resolve_profile("default").__class__(), ["transformer"]) is not None
    assert mmgp_backend.mmgp_arguments(s, ["transformer", "text_encoder", "vae"])["pinnedMemory"] == ["transformer"]

    handed = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "mmgp" else real_find_spec(n, *a))
    monkeypatch.setattr(mmgp_backend, "apply_mmgp", lambda models, settings: handed.update(models=models, s=settings))
    ensure_tiny_checkpoints(tmp_path)
    manager = ModelManager(tmp_path, device="cpu")
    manager.device = torch.device("cuda")  # as on a GPU machine; nothing below touches CUDA
    nets = manager._load(get_model("test-tiny-t2v"), p4)
    assert set(handed["models"]) == {"transformer", "text_encoder", "vae"}
    assert handed["s"].budgets_mb["transformer"] == 100
    assert nets.dit.blocks[0].ffn[0].weight.device.type == "cpu"  # loaded into RAM for mmgp
    assert not nets.handles and any("mmgp" in n for n in nets.notes)  # no own streaming with mmgp


def test_a_cancel_in_the_last_step_stops_before_decoding(engine, tmp_path):
    """Abort takes effect within one step, the last one too: nothing is decoded or written after it
    (the loop checks between steps; the engine checks again between its stages)."""
    token = CancelToken()

    def progress(info):
        if info.step == info.total:
            token.cancel()

    with pytest.raises(Cancelled, match="before decoding"):
        engine.generate(GenerationRequest(model="test-tiny-t2v", prompt="x", steps=2, output_dir=str(tmp_path / "o")),
                        progress=progress, cancel=token)
    assert not (tmp_path / "o").exists()
