"""The engine executes the memory plan the planner shows: ``auto`` becomes the numbered profile the
planner picks, ``offload: auto`` and budgets become whole loads or block streaming with the plan's
resident blocks (or mmgp budgets), explicit settings load as written, and mmgp leaves torch's
default device as it found it.

Machines are simulated (:class:`wan.optim.planner.Machine`), so the plans of real 14B models are
checked on the CPU; the TEST family loads and generates through the same path.
"""

import copy
import importlib.util
import sys
import types

import pytest
import torch

from wan.engine import Engine, GenerationRequest
from wan.engine.model_manager import ModelManager
from wan.optim import mmgp_backend, planner
from wan.optim.apply import execution_settings, load_settings
from wan.optim.planner import Machine, MiB, model_sizes, plan, resolve_auto, run_precision
from wan.optim.profile_files import load_profiles
from wan.optim.profiles import ProfileError, apply_overrides
from wan.registry import get_model
from wan.testing.tiny_encoders import TINY_T5
from wan.testing.tiny_family import ensure_tiny_checkpoints

DESKTOP = Machine.from_gb(64, 24)   # 64 GB of RAM, a 24 GB card
BIG = Machine.from_gb(128, 80)


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


@pytest.fixture(scope="module")
def t2v_14b():
    return get_model("wan2.1-t2v-14B")


def planned(profile, spec, machine, profiles):
    return plan(profile, model_sizes(spec, run_precision(profile, machine)), machine, profiles)


# -- auto and offload auto, on the real 14B spec -----------------------------------------------------


def test_auto_runs_the_numbered_profile_the_planner_picks(profiles, t2v_14b):
    auto = profiles.get("auto")
    sizes = model_sizes(t2v_14b, run_precision(auto, DESKTOP))
    resolved, chosen, why = resolve_auto(auto, sizes, DESKTOP, profiles)
    placement = planned(auto, t2v_14b, DESKTOP, profiles).placement("transformer")
    assert placement.mode != planner.GPU and chosen.memory.offload == "blocks"  # a 27 GB DiT on 24 GB streams

    s = execution_settings(auto, t2v_14b, DESKTOP, profiles)
    assert s.profile == resolved and s.profile.memory == chosen.memory and s.profile.quantize == chosen.quantize
    assert s.stream and s.resident_blocks == placement.resident_blocks and s.blocks_to_swap is None
    assert any(f"auto -> {chosen.label}" in n and why in n for n in s.notes)
    # the manager loads with the same settings (and names them in its key)
    manager = ModelManager(device="cpu", machine=DESKTOP)
    assert manager.settings(t2v_14b, auto) == s
    assert manager._key(t2v_14b, auto, {}, None) != ModelManager(device="cpu")._key(t2v_14b, auto, {}, None)


def test_auto_keeps_its_own_overrides(profiles, t2v_14b):
    auto = apply_overrides(profiles.get("auto"), {"memory.prefetch_blocks": 2})
    s = execution_settings(auto, t2v_14b, DESKTOP, profiles)
    assert s.prefetch == 2 and s.profile.memory.prefetch_blocks == 2 and s.stream


def test_offload_auto_with_a_budget_streams_with_the_plans_resident_blocks(profiles, t2v_14b):
    default = apply_overrides(profiles.get("default"), {"memory.transformer_budget_mb": 4096})
    placement = planned(default, t2v_14b, DESKTOP, profiles).placement("transformer")
    assert placement.mode == planner.STREAMED and 0 < placement.resident_blocks < placement.blocks
    s = execution_settings(default, t2v_14b, DESKTOP, profiles)
    assert s.stream and s.resident_blocks == placement.resident_blocks
    assert any(n.startswith("offload auto: blocks") for n in s.notes)


def test_offload_auto_as_many_blocks_as_fit_beside_the_models_this_path_keeps(profiles, t2v_14b):
    """Null budget: the plan keeps as many blocks as the free VRAM allows. Without mmgp the text
    encoder, which the plan keeps off the GPU, runs on the CPU; the VAE stays on the GPU whole, so
    at most as many blocks fit as the plan says, and a note says when fewer do."""
    default = profiles.get("default")
    result = planned(default, t2v_14b, DESKTOP, profiles)
    dit = result.placement("transformer")
    assert dit.budget_source == "free VRAM" and dit.resident_blocks > 0
    assert result.placement("text_encoder").mode != planner.GPU
    s = execution_settings(default, t2v_14b, DESKTOP, profiles)
    assert s.text_encoder_on_cpu and any("text encoder: runs on the CPU" in n for n in s.notes)
    assert s.stream and 0 < s.resident_blocks <= dit.resident_blocks
    beside = sum(p.bytes for p in result.placements if p.model not in ("transformer", "text_encoder"))
    rest = model_sizes(t2v_14b, "bf16")[0].rest_bytes
    held = beside + rest + (s.resident_blocks + 2) * dit.block_bytes  # + prefetch 1 and the current block
    assert held + default.memory.vram_reserve_mb * MiB <= DESKTOP.vram_bytes
    assert (s.resident_blocks < dit.resident_blocks) == any("stay on the GPU whole" in n for n in s.notes)


def test_without_mmgp_a_text_encoder_the_plan_keeps_off_the_gpu_runs_on_the_cpu(profiles):
    """umT5-XXL (~11 GB in bf16) beside the 1.3B DiT on a 12 GB card: the plan keeps the encoder off
    the GPU, so without mmgp (which moves models between phases) it runs on the CPU and the DiT gets
    the card. On a 24 GB card with profile 1 it only moves when used, and everything fits at once:
    it stays on the GPU. With mmgp, mmgp places it."""
    spec = get_model("wan2.1-t2v-1.3B")
    small = Machine.from_gb(64, 12)
    s = execution_settings(profiles.get("default"), spec, small, profiles)
    assert s.text_encoder_on_cpu and planned(profiles.get("default"), spec, small, profiles).placement(
        "text_encoder").mode != planner.GPU
    assert not execution_settings(profiles.get("1"), spec, DESKTOP, profiles).text_encoder_on_cpu
    assert not execution_settings(profiles.get("default"), spec, small, profiles, mmgp=True).text_encoder_on_cpu
    assert not execution_settings(profiles.get("default"), spec, Machine.from_gb(64, 0), profiles).text_encoder_on_cpu


@pytest.mark.parametrize("model_id, machine", [("wan2.1-t2v-1.3B", DESKTOP), ("wan2.1-t2v-14B", BIG)])
@pytest.mark.parametrize("mmgp", [False, True])
def test_offload_auto_keeps_a_dit_that_fits_resident(profiles, model_id, machine, mmgp):
    spec = get_model(model_id)
    default = profiles.get("default")
    assert planned(default, spec, machine, profiles).placement("transformer").mode == planner.GPU
    s = execution_settings(default, spec, machine, profiles, mmgp=mmgp)
    assert not s.stream and s.resident_blocks is None and s.mmgp is None
    assert "offload auto: none" in s.notes


def test_explicit_settings_load_as_written(profiles, t2v_14b):
    default = profiles.get("default")
    swap = apply_overrides(default, {"memory.blocks_to_swap": 10})
    for machine in (DESKTOP, Machine.from_gb(64)):
        s = execution_settings(swap, t2v_14b, machine, profiles)
        assert (s.stream, s.blocks_to_swap, s.resident_blocks) == (True, 10, None)
    none = apply_overrides(default, {"memory.offload": "none"})
    s = execution_settings(none, t2v_14b, DESKTOP, profiles)  # does not fit: loads whole all the same
    assert not s.stream and s.resident_blocks is None and any("does not fit" in n for n in s.notes)
    for mode in ("fp8", "int8"):  # quantised layers stream (fp8 ones as an fp8 file stores them)
        q = execution_settings(apply_overrides(default, {"memory.offload": "blocks", "quantize.transformer": mode}),
                               t2v_14b, DESKTOP, profiles)
        assert q.stream and q.quant_transformer == mode and q.resident_blocks is not None
    with pytest.raises(ProfileError, match="compile with block streaming"):
        execution_settings(apply_overrides(default, {"memory.offload": "blocks", "compile": True}),
                           t2v_14b, DESKTOP, profiles)


def test_without_a_gpu_the_profile_applies_as_written(profiles, t2v_14b):
    cpu = Machine.from_gb(64)
    for name in ("auto", "default", "4"):
        s = execution_settings(profiles.get(name), t2v_14b, cpu, profiles)
        assert s.profile == profiles.get(name) and s.notes == ()
        assert (s.stream, s.prefetch, s.blocks_to_swap, s.quant_transformer, s.quant_text_encoder,
                s.compile) == load_settings(profiles.get(name))
        assert s.resident_blocks is None
    assert not ModelManager(device="cpu").settings(t2v_14b, profiles.get("auto")).stream


def test_mmgp_gets_the_plans_budgets(profiles, t2v_14b):
    auto = profiles.get("auto")
    result = planned(auto, t2v_14b, DESKTOP, profiles)
    s = execution_settings(auto, t2v_14b, DESKTOP, profiles, mmgp=True)
    assert not s.stream and s.mmgp is not None
    for p in result.placements:
        expected = 0 if p.mode == planner.MOVED else p.budget_bytes // MiB
        assert s.mmgp.budgets_mb[p.model] == expected
    assert s.mmgp.budgets_mb["transformer"] == 100  # profile 2's transformer budget
    # a budget from the free VRAM, in MB; offload auto that needs no offload needs no mmgp
    default = profiles.get("default")
    dit = planned(default, t2v_14b, DESKTOP, profiles).placement("transformer")
    assert execution_settings(default, t2v_14b, DESKTOP, profiles, mmgp=True).mmgp.budgets_mb["transformer"] == \
        dit.budget_bytes // MiB > 100
    assert execution_settings(default, t2v_14b, BIG, profiles, mmgp=True).mmgp is None


# -- mmgp leaves the default device as it was ---------------------------------------------------------


@pytest.mark.parametrize("before", [None, "meta"])
@pytest.mark.parametrize("fails", [False, True])
def test_apply_mmgp_restores_the_default_device(monkeypatch, before, fails):
    def fake_all(pipe, pinnedMemory=False, budgets=0, verboseLevel=-1):
        torch.set_default_device("cuda")  # as mmgp.offload.all ends
        if fails:
            raise RuntimeError("mmgp failed")
        return "offloaded"

    monkeypatch.setitem(sys.modules, "mmgp", types.SimpleNamespace(offload=types.SimpleNamespace(all=fake_all)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = torch.nn.Linear(2, 2)
    torch.set_default_device(before)
    try:
        if fails:
            with pytest.raises(RuntimeError, match="mmgp failed"):
                mmgp_backend.apply_mmgp({"transformer": model}, mmgp_backend.MmgpSettings())
        else:
            assert mmgp_backend.apply_mmgp({"transformer": model}, mmgp_backend.MmgpSettings()) == "offloaded"
        assert torch.get_default_device() == torch.device(before or "cpu")
        if before is None:
            assert torch.zeros(1).device.type == "cpu"
    finally:
        torch.set_default_device(None)


def mmgp_dtype_rule(models: dict) -> None:
    """What mmgp 3.x's ``offload.all`` does to dtypes when it takes models (its "Scanning Sizes"
    pass, as its source reads): in a module without ``_lock_dtype`` each float32 parameter is cast
    to the model's ``_convertWeightsFloatTo`` (default bf16; None: kept), and every parameter not
    locked must then have one dtype per model (mmgp asserts it)."""
    for model in models.values():
        convert = getattr(model, "_convertWeightsFloatTo", torch.bfloat16)
        model_dtype = None
        for module in model.modules():
            if hasattr(module, "_lock_dtype"):
                continue
            for p in module.parameters(recurse=False):
                if convert is not None and p.dtype == torch.float32:
                    p.data = p.data.to(model_dtype or convert)
                model_dtype = model_dtype or p.dtype
                assert p.dtype == model_dtype, "mmgp: one dtype per model"


def test_mmgp_keeps_every_parameter_in_the_dtype_it_was_loaded_in(monkeypatch):
    """Without the switches mmgp casts the DiT's float32 islands and a float32 VAE to bf16; with
    them (``keep_loaded_dtypes``, called by ``apply_mmgp``) nothing changes dtype."""
    from parallel_harness import tiny_dit
    from wan.models.dit import WanDiT

    def dtypes(model):
        return {n: p.dtype for n, p in model.named_parameters()}
    dit, vae = tiny_dit("t2v", 1, torch.bfloat16), torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    islands = {n for n, d in dtypes(dit).items() if d == torch.float32}
    assert islands and all(WanDiT.keep_in_fp32(n) for n in islands)
    mixed = torch.nn.Linear(4, 4).to(torch.bfloat16)  # a module of both dtypes: mmgp makes it one
    mixed.bias.data = mixed.bias.data.float()
    dit.mixed = mixed
    plain_dit, plain_vae = tiny_dit("t2v", 1, torch.bfloat16), copy.deepcopy(vae)
    mmgp_dtype_rule({"transformer": plain_dit, "vae": plain_vae})  # mmgp's default: all bf16
    assert set(dtypes(plain_dit).values()) == set(dtypes(plain_vae).values()) == {torch.bfloat16}

    before = (dtypes(dit), dtypes(vae))
    monkeypatch.setitem(sys.modules, "mmgp", types.SimpleNamespace(offload=types.SimpleNamespace(
        all=lambda pipe, **kwargs: mmgp_dtype_rule(pipe))))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        mmgp_backend.apply_mmgp({"transformer": dit, "vae": vae}, mmgp_backend.MmgpSettings())
    finally:
        torch.set_default_device(None)
    assert (dtypes(dit), dtypes(vae)) == ({**before[0], "mixed.bias": torch.bfloat16}, before[1])
    assert {n.rpartition(".")[0] for n in islands} == {n for n, m in dit.named_modules() if hasattr(m, "_lock_dtype")}


# -- the TEST family through the manager and the engine -----------------------------------------------


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    return root


@pytest.fixture
def tiny_sizes(monkeypatch):
    """Gives the planner the tiny text encoder's and VAE's sizes (the TEST family has none)."""
    monkeypatch.setitem(planner.TEXT_ENCODER_DIMS, "tiny-umt5",
                        tuple(TINY_T5[k] for k in ("vocab", "dim", "dim_attn", "ffn", "heads", "layers", "buckets")))
    monkeypatch.setitem(planner.VAE_PARAMS, "2.1", 100_000)


def test_auto_resolves_when_the_models_load(tiny_root, tiny_sizes, profiles):
    """With too little VRAM for any numbered profile, auto takes 5: the DiT streams with no block
    resident (none fit beside the others) and the text encoder is quantised to int8, as 5 says."""
    machine = Machine(ram_bytes=64 << 30, vram_bytes=(2 << 30) + (1 << 20), gpu_name="simulated")
    manager = ModelManager(tiny_root, device="cpu", dtype=torch.float32, machine=machine)
    nets = manager._load(get_model("test-tiny-t2v"), profiles.get("auto"))
    try:
        assert any("auto -> 5 VeryLowRAM_LowVRAM" in n for n in nets.notes)
        assert len(nets.handles) == 1 and nets.handles[0].resident == []
        assert any(n.startswith("text encoder: int8") for n in nets.notes)
        assert any(n.startswith("text encoder: runs on the CPU") for n in nets.notes)
    finally:
        for h in nets.handles:
            h.close()


def test_mmgp_gets_the_plans_budgets_when_the_models_load(tiny_root, tiny_sizes, profiles, monkeypatch):
    handed = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "mmgp" else real_find_spec(n, *a))
    monkeypatch.setattr(mmgp_backend, "apply_mmgp", lambda models, settings: handed.update(models=models, s=settings))
    machine = Machine(ram_bytes=64 << 30, vram_bytes=(2 << 30) + (1 << 20), gpu_name="simulated")
    manager = ModelManager(tiny_root, device="cpu", machine=machine)
    manager.device = torch.device("cuda")  # as on a GPU machine; nothing below touches CUDA
    nets = manager._load(get_model("test-tiny-t2v"), profiles.get("auto"))
    assert handed["s"].budgets_mb == {"transformer": 100, "text_encoder": 1000, "vae": 0}  # profile 5's
    assert handed["s"].pinned == () and not nets.handles


def test_streaming_from_the_plan_generates_what_the_resident_load_does(tiny_root, tiny_sizes, profiles):
    """Profile 2 with a 2 MB DiT budget on a simulated 24 GB card: the plan keeps one of the two
    blocks resident; the engine streams the other and computes the same latents."""
    spec = get_model("test-tiny-t2v")
    two = apply_overrides(profiles.get("2"), {"memory.transformer_budget_mb": 2})
    assert planned(two, spec, DESKTOP, profiles).placement("transformer").resident_blocks == 1

    resident = Engine(checkpoint_dir=tiny_root, device="cpu", dtype=torch.float32)
    streamed = Engine(checkpoint_dir=tiny_root, device="cpu", dtype=torch.float32)
    streamed.models.machine = DESKTOP
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", seed=5, steps=3)
    expected = resident.generate(req, write=False)
    got = streamed.generate(req.replace(profile="2", profile_overrides={"memory.transformer_budget_mb": 2}),
                            write=False)
    try:
        assert not resident.models.current.handles
        handles = streamed.models.current.handles
        assert len(handles) == 1 and len(handles[0].resident) == 1 and len(handles[0].units) == 2
        assert any("1 of 2 blocks resident" in n for n in got.notices)
        assert torch.equal(expected.latent, got.latent)
    finally:
        streamed.models.release()


def test_quantised_streaming_generates_what_the_whole_quantised_load_does(tiny_root, tmp_path):
    """quantize.transformer with block streaming: a DiT file that stores its linears in fp8
    (ComfyUI's layout) streams its fp8 layers as stored, and a float file is quantised as each block
    is read; either way the latents equal those of the same file loaded whole and quantised."""
    from safetensors.torch import load_file, save_file
    plain = tiny_root / "tiny" / "t2v" / "transformer.safetensors"
    state = {}
    for k, v in load_file(str(plain)).items():
        key = "model.diffusion_model." + k
        if v.ndim == 2 and k.endswith(".weight") and "norm" not in k:
            scale = v.abs().max() / 448.0
            state[key], state[key[:-len(".weight")] + ".scale_weight"] = (v / scale).to(torch.float8_e4m3fn), \
                scale.reshape(1)
        else:
            state[key] = v
    fp8 = tmp_path / "tiny_t2v_fp8_scaled.safetensors"
    save_file(state, str(fp8))
    engine = Engine(checkpoint_dir=tiny_root, device="cpu", dtype=torch.float32)
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", seed=5, steps=3, profile="default")
    whole = engine.generate(req.replace(profile_overrides={"quantize.transformer": "fp8"}), write=False,
                            files={"transformer": str(fp8)})
    assert not engine.models.current.handles
    streaming = {"quantize.transformer": "fp8", "memory.offload": "blocks", "memory.blocks_to_swap": 1}
    streamed = engine.generate(req.replace(profile_overrides=streaming), write=False, files={"transformer": str(fp8)})
    try:
        (handle,) = engine.models.current.handles
        assert len(handle.resident) == 1 and any("fp8 layers kept fp8, 1 of 2 blocks resident" in n
                                                 for n in streamed.notices)
        assert torch.equal(whole.latent, streamed.latent)
    finally:
        engine.models.release()
    for mode in ("fp8_scaled", "int8"):  # the float file, quantised as its blocks are read
        whole = engine.generate(req.replace(profile_overrides={"quantize.transformer": mode}), write=False)
        streamed = engine.generate(req.replace(profile_overrides={**streaming, "quantize.transformer": mode}),
                                   write=False)
        try:
            assert any(f"quantised to {mode} as each block is read, 1 of 2 blocks resident" in n
                       for n in streamed.notices)
            assert torch.equal(whole.latent, streamed.latent)
        finally:
            engine.models.release()
