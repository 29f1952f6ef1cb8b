"""Guidance phases and few-step accelerator LoRAs (issue 17).

- A three-phase run (Wan2GP's "Lightning 3 phases", through the ``lightning-3phase`` profile) on the
  TEST A14B model: the guidance, expert, passes and LoRA multipliers in effect at each step match a
  table written by hand.
- Guidance 1 runs exactly one DiT pass per step (counted on the network).
- The accelerator profiles load and resolve on the models they are for.
- The registry's accelerator LoRAs fit their models. Their files are not downloaded: each file's key
  layout is rebuilt from the tool its authors made it with, at the real model's shapes (lightx2v's
  extractor, ModelTC/LightX2V tools/extract/lora_extractor.py: 2-D weights of 1M values or more as
  rank-r lora_down/lora_up, other tensors as .diff/.diff_b/.diff_m; ModelTC/Wan2.2-Lightning's
  loader: lora_down/lora_up/alpha in float32 on each block's linears; ComfyUI's LoRA extraction for
  Kijai's files), and checked two ways: (1) at the real shapes (meta tensors) against the
  architecture of each model the entry fits, and against the byte size the Hub shows for the file
  (which tells the layouts apart: a .diff_m per block, for example, is 2.5 MB); (2) written as tiny
  safetensors files with the same key names and the TEST models' shapes, loaded by the real
  loader and checked against the TEST model of the same kind.
- The samplers: our euler is the grid and step of lightx2v's step-distill scheduler and of
  Wan2.2-Lightning's EulerScheduler; lcm is FastVideo's DMD loop; both against hand-written
  references.
"""

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from wan.engine import Engine, GenerationRequest, RequestError, resolve_request
from wan.engine.phases import PhasePlan
from wan.lora.apply import LoraRuntime
from wan.lora.compat import check_lora, model_linear_shapes
from wan.lora.formats import load_lora, parse_lora_state
from wan.lora.schedule import PhaseLayout, parse_multiplier
from wan.models.dit import DiTConfig, WanDiT
from wan.registry import get_model, load_registry
from wan.testing.tiny_family import ensure_tiny_checkpoints

# -- key layouts of the published files ---------------------------------------------------------

BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
IMAGE_ONLY = ("k_img", "v_img", "norm_k_img", "img_emb.")


def parameters(model_id: str) -> dict[str, tuple[int, ...]]:
    """Official parameter name -> shape of a registry model, built on the meta device."""
    with torch.device("meta"):
        dit = WanDiT(DiTConfig(**get_model(model_id).dit_config()))
    return {n: tuple(p.shape) for n, p in dit.named_parameters()}


def extracted(params: dict, rank: int, diff_m: bool = False) -> dict[str, tuple]:
    """lightx2v's extractor: 2-D weights of >= 1M values as LoRA, the rest as full deltas."""
    out = {}
    for name, shape in params.items():
        if name.endswith(".weight") and len(shape) == 2 and math.prod(shape) >= 1_000_000:
            out[name[:-7] + ".lora_down.weight"] = (rank, shape[1])
            out[name[:-7] + ".lora_up.weight"] = (shape[0], rank)
        elif name.endswith(".weight"):
            out[name[:-7] + ".diff"] = shape
        elif name.endswith(".bias"):
            out[name[:-5] + ".diff_b"] = shape
        elif name.endswith(".modulation") and diff_m:
            out[name[:-11] + ".diff_m"] = shape
    return out


def blocks(params: dict, rank: int, alpha: bool = False) -> dict[str, tuple]:
    """LoRA on the ten linears of each block only (Wan2.2-Lightning with alpha; lightx2v's 1217)."""
    out = {}
    for name, shape in params.items():
        module = name[:-7]
        if name.startswith("blocks.") and name.endswith(".weight") and module.split(".", 2)[2] in BLOCK_LINEARS:
            out[module + ".lora_down.weight"], out[module + ".lora_up.weight"] = (rank, shape[1]), (shape[0], rank)
            if alpha:
                out[module + ".alpha"] = ()
    return out


def comfy_extracted(params: dict, rank: int) -> dict[str, tuple]:
    """ComfyUI's extraction (Kijai's files): every weight of 2 or more dims as LoRA (convs
    flattened), norms as .diff, biases as .diff_b."""
    out = {}
    for name, shape in params.items():
        if name.endswith(".weight") and len(shape) >= 2:
            out[name[:-7] + ".lora_down.weight"] = (rank, math.prod(shape[1:]))
            out[name[:-7] + ".lora_up.weight"] = (shape[0], rank)
        elif name.endswith(".weight"):
            out[name[:-7] + ".diff"] = shape
        elif name.endswith(".bias"):
            out[name[:-5] + ".diff_b"] = shape
    return out


def with_image_keys(params: dict, donor: str) -> dict:
    """``params`` plus the image cross-attention of ``donor`` (a Wan 2.1 I2V model)."""
    return {**params, **{n: s for n, s in parameters(donor).items() if any(k in n for k in IMAGE_ONLY)}}


# file -> (layout of (parameters, rank), bytes per value, size the Hub shows, whether that size is exact)
PUBLISHED = {
    # lightx2v/Wan2.1-Distill-Loras (Hub: 631 MB and 739 MB)
    "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors": (extracted, 2, 631e6, False),
    "wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors": (extracted, 2, 739e6, False),
    # lightx2v/Wan2.2-Distill-Loras (Hub: low 1217 614 MB; i2v 1022 high 635 MB, low 739 MB: the low one
    # carries Wan 2.1 I2V's image cross-attention, ModelTC/LightX2V issue 1246)
    "wan2.2_t2v_A14b_high_noise_lora_rank64_lightx2v_4step_1217.safetensors": (blocks, 2, None, False),
    "wan2.2_t2v_A14b_low_noise_lora_rank64_lightx2v_4step_1217.safetensors": (blocks, 2, 614e6, False),
    "wan2.2_i2v_A14b_high_noise_lora_rank64_lightx2v_4step_1022.safetensors":
        (lambda p, r: extracted(p, r, diff_m=True), 2, 635e6, False),
    "wan2.2_i2v_A14b_low_noise_lora_rank64_lightx2v_4step_1022.safetensors":
        (lambda p, r: extracted(with_image_keys(p, "wan2.1-i2v-14B-480P"), r), 2, 739e6, False),
    # lightx2v/Wan2.2-Lightning, float32 (the Hub shows 1.23 GB; a copy's LFS pointer gives 1226977424 bytes)
    "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/high_noise_model.safetensors":
        (lambda p, r: blocks(p, r, alpha=True), 4, 1_226_977_424, True),
    "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/low_noise_model.safetensors":
        (lambda p, r: blocks(p, r, alpha=True), 4, 1_226_977_424, True),
    "Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/high_noise_model.safetensors":
        (lambda p, r: blocks(p, r, alpha=True), 4, 1_226_977_424, True),
    "Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/low_noise_model.safetensors":
        (lambda p, r: blocks(p, r, alpha=True), 4, 1_226_977_424, True),
    # Kijai/WanVideo_comfy (Hub: 661 MB)
    "FastWan/Wan2_2_5B_FastWanFullAttn_lora_rank_128_bf16.safetensors": (comfy_extracted, 2, 661e6, False),
}
# the TEST model of the same kind as each real model (same conditioning, experts and image layers)
TINY_OF = {"wan2.1-t2v-14B": "test-tiny-t2v", "wan2.1-t2i-14B": "test-tiny-t2v", "wan2.1-i2v-14B-480P": "test-tiny-i2v",
           "wan2.1-i2v-14B-720P": "test-tiny-i2v", "wan2.2-t2v-A14B": "test-tiny-t2v-a14b",
           "wan2.2-i2v-A14B": "test-tiny-i2v-a14b", "wan2.2-ti2v-5B": "test-tiny-ti2v"}


def header(layout: dict[str, tuple], device="meta") -> dict[str, torch.Tensor]:
    """A LoRA state dict of these keys and shapes, "diffusion_model."-prefixed (alphas are real
    scalars: the reader takes their value)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for key, shape in layout.items():
        if key.endswith(".alpha"):
            out[key] = torch.tensor(float(4 if device != "meta" else 64))
        elif device == "meta":
            out[key] = torch.empty(shape, device="meta")
        else:
            out[key] = torch.randn(shape, generator=g) * 0.05
    return {f"diffusion_model.{k}": v for k, v in out.items()}


def registry_files():
    reg = load_registry()
    assert {e.accelerator for e in reg.loras.values()} == {"lightx2v", "lightning", "fastwan"}
    return [(e, role, src.files[0]) for e in reg.loras.values() for role, src in e.files.items()]


@pytest.mark.parametrize("entry,role,path", registry_files(), ids=lambda v: getattr(v, "id", str(v)))
def test_published_lora_fits_each_model_of_its_entry(entry, role, path):
    """(1) At the published shapes: every adapter matches a layer of each model the entry fits
    (image-only ones aside on a model without image input), the size agrees with the Hub's, and
    the file is identified as made for that model family, not another size."""
    layout_of, width, published, exact = PUBLISHED[path]
    for model_id in entry.fits:
        layout = layout_of(parameters(model_id), entry.rank)
        lora = parse_lora_state(header(layout), path)
        assert not [d for d in lora.dropped if not d.split(":")[0].endswith(".diff_m")], lora.dropped
        compat = check_lora(lora, model_linear_shapes(get_model(model_id)))
        assert compat.status == "full", compat.summary()
        dim = get_model(model_id).arch.dim
        assert f"dim {dim}" in compat.guess
        if published:
            data = sum(math.prod(s) * (width if s else 4) for s in layout.values())
            slack = 1e6 if exact else max(published * 0.002, 1e6)  # the header, or the Hub's rounding
            assert (0 <= published - data <= slack) if exact else abs(published - data) <= slack, (path, data)
    other = "wan2.2-ti2v-5B" if get_model(entry.fits[0]).arch.dim != 3072 else "wan2.1-t2v-14B"
    lora = parse_lora_state(header(layout_of(parameters(entry.fits[0]), entry.rank)), path)
    assert check_lora(lora, model_linear_shapes(get_model(other))).status == "none"


@pytest.mark.parametrize("entry,role,path", registry_files(), ids=lambda v: getattr(v, "id", str(v)))
def test_tiny_file_of_the_published_keys_fits_the_test_model(entry, role, path, tmp_path):
    """(2) The same key names at the TEST model's shapes, as a file through the real loader."""
    real_id = entry.fits[0]
    tiny_id = TINY_OF[real_id]
    real_keys = PUBLISHED[path][0](parameters(real_id), entry.rank)
    tiny = parameters(tiny_id)
    if "img_emb" in " ".join(real_keys):  # image layers of the TEST i2v model (A14B has none)
        tiny = with_image_keys(tiny, "test-tiny-i2v")
    rank = 4
    layout = {}
    for key, _ in real_keys.items():
        module = key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]
        if key.startswith("blocks.") and int(key.split(".")[1]) >= 2:
            continue  # the TEST models have two blocks
        if key.endswith(".lora_down.weight"):
            shape = tiny[module + ".weight"]
            layout[key] = (rank, math.prod(shape[1:]))
        elif key.endswith(".lora_up.weight"):
            layout[key] = (tiny[module + ".weight"][0], rank)
        elif key.endswith(".alpha"):
            layout[key] = ()
        else:
            suffix = {"diff": ".weight", "diff_b": ".bias", "diff_m": ".modulation"}[key.rsplit(".", 1)[1]]
            layout[key] = tiny[module + suffix]
    file = tmp_path / "lora.safetensors"
    save_file(header(layout, device="cpu"), str(file))
    lora = load_lora(file)
    compat = check_lora(lora, model_linear_shapes(get_model(tiny_id)))
    assert compat.status == "full" and compat.matched == compat.total > 0, compat.summary()
    assert bool(compat.dropped_i2v) == (real_id == "wan2.2-i2v-A14B" and "img_emb.proj.1.lora_down.weight" in real_keys)


# -- the engine on the TEST models --------------------------------------------------------------

TEST_ACCELERATORS = {"loras": {
    "lightning-test-a14b": {
        "display_name": "TEST Lightning pair", "accelerator": "lightning", "fits": ["test-tiny-t2v-a14b"],
        "files": {"high_noise": {"repo": "test/none", "file": "high_noise_model.safetensors"},
                  "low_noise": {"repo": "test/none", "file": "low_noise_model.safetensors"}},
        "rank": 4, "layout": "lightning", "dtype": "fp32", "source": "tests/test_guidance_phases.py"},
    "fastwan-test-ti2v": {
        "display_name": "TEST FastWan", "accelerator": "fastwan", "fits": ["test-tiny-ti2v"],
        "files": {"transformer": {"repo": "test/none", "file": "fastwan.safetensors"}},
        "rank": 4, "layout": "kijai", "source": "tests/test_guidance_phases.py"},
}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("phases")
    ensure_tiny_checkpoints(root / "ckpt")
    (root / "specs").mkdir()
    (root / "specs" / "accelerators.yaml").write_text(yaml.safe_dump(TEST_ACCELERATORS))
    registry = load_registry([root / "specs"])
    loras = root / "loras"
    for entry in registry.loras.values():
        tiny = parameters(entry.fits[0])
        if entry.layout == "lightning":
            def make(p):
                return blocks(p, 4, alpha=True)
        else:
            def make(p):
                return comfy_extracted(p, 4)
        for seed, role in enumerate(entry.files):
            path = loras / entry.lora_name(role, "test")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(seed)
            save_file(header(make(tiny), device="cpu"), str(path))
    engine = Engine(checkpoint_dir=root / "ckpt", device="cpu", dtype=torch.float32, registry=registry, lora_dir=loras)
    return engine, registry


def test_three_phase_table_of_guidance_expert_and_lora_multipliers(setup, monkeypatch):
    """lightning-3phase on the TEST A14B: 8 euler steps at shift 3 (timesteps 1000, 954.5, 900,
    833.3, 750, 642.9, 500, 300), phase 2 below 965, the low-noise expert below 800; the
    high-noise file's LoRA at "0;1;0", the low-noise file's at "0;0;1"."""
    engine, _ = setup
    seen = []
    set_step = LoraRuntime.set_step

    def record(self, step, steps, expert="transformer", switch_step=None, layout=None):
        set_step(self, step, steps, expert, switch_step, layout)
        seen.append((step, expert, tuple(self.multipliers())))
    monkeypatch.setattr(LoraRuntime, "set_step", record)
    result = engine.generate(GenerationRequest(model="test-tiny-t2v-a14b", prompt="a fox", seed=3, frames=5,
                                               profile="lightning-3phase"), write=False)
    req = result.request
    assert (req.steps, req.guidance_phases, req.model_switch_phase, req.boundary, req.shift, req.sampler) == (
        8, 3, 2, 0.8, 3.0, "euler")
    assert [lo.multiplier for lo in req.loras] == ["0;1;0", "0;0;1"]
    table = [(s.step, s.phase, s.expert, s.guidance, s.passes) + m for s, (_, _, m) in zip(result.steps, seen)]
    H, L, CFG, ONE = "high_noise", "low_noise", ("cond", "uncond"), ("cond",)
    # step, phase, expert, guidance, passes, (multiplier of the high-noise file, of the low-noise file)
    assert table == [
        (1, 1, H, 3.5, CFG, 0.0, 0.0),
        (2, 2, H, 1.0, ONE, 1.0, 0.0),
        (3, 2, H, 1.0, ONE, 1.0, 0.0),
        (4, 2, H, 1.0, ONE, 1.0, 0.0),
        (5, 3, L, 1.0, ONE, 0.0, 1.0),
        (6, 3, L, 1.0, ONE, 0.0, 1.0),
        (7, 3, L, 1.0, ONE, 0.0, 1.0),
        (8, 3, L, 1.0, ONE, 0.0, 1.0),
    ]
    assert [s for s, e, _ in seen] == list(range(8)) and [e for _, e, _ in seen] == [H] * 4 + [L] * 4
    assert any("phase 2: steps 2-4, high-noise expert" in n for n in result.notices)
    # the metadata rebuilds the run: the same request again, LoRAs not added twice
    again, _ = resolve_request(GenerationRequest.from_dict(result.metadata["request"]), engine.registry)
    assert again == req


def dit_passes(engine, req, warm: bool = True):
    """(DiT forward calls of one run of ``req``, its result)."""
    if warm:  # one step first: the model is loaded, so its networks can be counted
        engine.generate(req.replace(steps=1, timesteps=[999.0], sampler="euler", width=64, height=64), write=False)
    calls = []
    hooks = [dit.register_forward_hook(lambda *a: calls.append(1)) for dit in engine.models.current.dits.values()]
    try:
        result = engine.generate(req, write=False)
    finally:
        for h in hooks:
            h.remove()
    return len(calls), result


def test_guidance_1_runs_one_dit_pass_per_step(setup):
    engine, _ = setup
    base = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=3, seed=1, frames=5)
    assert dit_passes(engine, base.replace(guidance=1.0))[0] == 3
    assert dit_passes(engine, base.replace(guidance=5.0), warm=False)[0] == 6


def test_fastwan_profile_runs_lcm_at_its_timesteps_one_pass_per_step(setup):
    """FastWan on the TEST TI2V: 3 steps at 1000/757/522, guidance 1, the lcm sampler, its LoRA."""
    engine, _ = setup
    n, result = dit_passes(engine, GenerationRequest(model="test-tiny-ti2v", prompt="a fox", seed=1, frames=5,
                                                     profile="fastwan-3step"))
    assert n == 3 and [s.timestep for s in result.steps] == [1000.0, 757.0, 522.0]
    assert result.request.sampler == "lcm" and [s.passes for s in result.steps] == [("cond",)] * 3
    assert [lo.path for lo in result.request.loras] == ["test/accelerators/fastwan-test-ti2v.safetensors"]


# -- profiles, requests ------------------------------------------------------------------------


ACCEL = "wan2.2-a14b/accelerators/lightx2v-wan2.2-i2v-A14B"


@pytest.mark.parametrize("profile,model,expected", [
    ("lightx2v-4step", "wan2.1-t2v-14B", dict(steps=4, guidance=1.0, shift=5.0, sampler="euler", guidance_phases=1,
                                              loras=["wan2.1-t2v-14B/accelerators/"
                                                     "lightx2v-wan2.1-t2v-14B.safetensors:1"])),
    ("lightx2v-4step", "wan2.2-i2v-A14B", dict(steps=4, guidance=1.0, guidance_high_noise=1.0, shift=5.0, boundary=0.9,
                                               loras=[f"{ACCEL}-high_noise.safetensors:1;0",
                                                      f"{ACCEL}-low_noise.safetensors:0;1"])),
    ("lightning-4step", "wan2.2-t2v-A14B", dict(steps=4, guidance=1.0, guidance_high_noise=1.0, shift=5.0,
                                                sampler="euler", guidance_phases=2, boundary=0.875)),
    ("lightning-3phase", "wan2.2-t2v-A14B", dict(steps=8, guidance_high_noise=3.5, guidance2_scale=1.0,
                                                 guidance3_scale=1.0, switch_threshold=965.0, switch_threshold2=800.0,
                                                 model_switch_phase=2, boundary=0.8, shift=3.0)),
    ("fastwan-3step", "wan2.2-ti2v-5B", dict(steps=3, timesteps=[1000.0, 757.0, 522.0], guidance=1.0, sampler="lcm")),
])
def test_accelerator_profiles_load_and_set_their_recipe(profile, model, expected):
    from wan.optim.profile_files import load_profiles
    assert load_profiles().get(profile).sampling.accelerator
    image = "start.png" if "i2v" in model else None
    req, _ = resolve_request(GenerationRequest(model=model, prompt="p", profile=profile, image=image),
                             check_files=False)
    for name, value in expected.items():
        got = [f"{lo.path}:{lo.multiplier}" for lo in req.loras] if name == "loras" else getattr(req, name)
        assert got == value, name
    # the request's own settings win over the recipe's
    mine, _ = resolve_request(GenerationRequest(model=model, prompt="p", profile=profile, image=image, steps=12),
                              check_files=False)
    assert mine.steps == 12 and mine.loras == req.loras and mine.timesteps == []


def test_accelerator_profile_on_a_model_without_its_lora_is_refused():
    with pytest.raises(RequestError, match="profile: 'lightning-4step'.*wan2.2-i2v-A14B, wan2.2-t2v-A14B; "
                                           "wan2.1-t2v-1.3B has none"):
        resolve_request(GenerationRequest(model="wan2.1-t2v-1.3B", prompt="p", profile="lightning-4step"),
                        check_files=False)


A14B = dict(model="test-tiny-t2v-a14b", prompt="p")
T2V = dict(model="test-tiny-t2v", prompt="p")


@pytest.mark.parametrize("fields,field,words", [
    (dict(A14B, guidance_phases=1), "guidance_phases", "2 or 3 for a two-expert model"),
    (dict(T2V, guidance_phases=4), "guidance_phases", "1, 2 or 3"),
    (dict(T2V, guidance3_scale=1.0, guidance_phases=2), "guidance3_scale", "only with --guidance_phases 3"),
    (dict(T2V, guidance2_scale=1.0), "guidance2_scale", "only with --guidance_phases 2 or 3"),
    (dict(T2V, guidance_phases=2), "switch_threshold", "where phase 2 starts"),
    (dict(T2V, guidance_phases=3, switch_threshold=500, switch_threshold2=900), "switch_threshold2",
     "at most switch_threshold"),
    (dict(T2V, guidance_phases=2, switch_threshold=1200), "switch_threshold", "from 0 to 1000"),
    (dict(T2V, model_switch_phase=1), "model_switch_phase", "only for two-expert models"),
    (dict(A14B, model_switch_phase=2), "model_switch_phase", "1: the low-noise expert takes over after phase 1"),
    (dict(A14B, boundary=0.9, switch_threshold=875), "switch_threshold", "--boundary 0.9 puts at 900"),
    # 4 unipc steps at shift 5 (timesteps 999, 937, 833, 624): none in [950, 990) for phase 2
    (dict(T2V, guidance_phases=3, switch_threshold=990, switch_threshold2=950), "switch_threshold2",
     "phase 2 gets none of this run's timesteps (999, 937, 833, 624"),
    (dict(T2V, loras=[{"path": "x", "multiplier": "0;1;0"}], guidance_phases=2, switch_threshold=900), "loras",
     "3 per-phase values but the run has 2"),
    (dict(T2V, loras=[{"path": "x", "multiplier": "1;0"}]), "loras", "single transformer"),
    (dict(T2V, timesteps=[1000, 500], sampler="unipc"), "timesteps", "only with --sampler euler or lcm"),
    (dict(T2V, timesteps=[500, 1000], sampler="euler"), "timesteps", "strictly decreasing"),
    (dict(T2V, timesteps=[1000, 500], sampler="euler", steps=3), "steps", "the number of --timesteps"),
])
def test_phase_settings_that_cannot_apply_are_refused(fields, field, words):
    with pytest.raises(RequestError) as e:
        resolve_request(GenerationRequest.from_dict(fields), check_files=False)
    assert e.value.field == field and words in str(e.value), str(e.value)


def test_two_phase_a14b_is_the_expert_switch_of_before():
    """Default A14B: 2 phases switching at boundary*1000 with the two experts' guidance, exactly the
    old rule; the same switch given as Wan2GP's switch_threshold resolves to the same boundary."""
    req, spec = resolve_request(GenerationRequest(**A14B), check_files=False)
    assert (req.guidance_phases, req.model_switch_phase, req.switch_threshold) == (2, 1, None)
    plan = PhasePlan.of_request(req, True)
    assert plan == PhasePlan(("high_noise", "low_noise"), (4.0, 3.0), (875.0,))
    for t in (1000.0, 875.0, 874.99, 0.0):
        assert plan.at(t) == (("high_noise", 4.0) if t >= 875 else ("low_noise", 3.0))
    wan2gp, _ = resolve_request(GenerationRequest(**A14B, switch_threshold=875), check_files=False)
    assert wan2gp.boundary == 0.875 and PhasePlan.of_request(wan2gp, True).thresholds == (875.0,)


def test_per_phase_multipliers_over_a_phase_layout():
    """Each side spread over its phase's steps; a two-sided string on a 3-phase A14B run stays per
    expert; one side covers the whole run."""
    layout = PhaseLayout(steps=8, starts=(0, 1, 4), experts=("high_noise", "high_noise", "low_noise"))
    assert parse_multiplier("0;1;0").per_step_in(layout) == [0, 1, 1, 1, 0, 0, 0, 0]
    assert parse_multiplier("0;1,0.5;1,0").per_step_in(layout) == [0, 1, 1, 0.5, 1, 1, 0, 0]
    assert parse_multiplier("1,0.5;0").per_step_in(layout) == [1, 1, 0.5, 0.5, 0, 0, 0, 0]
    assert parse_multiplier("1,0").per_step_in(layout) == [1, 1, 1, 1, 0, 0, 0, 0]
    one = PhaseLayout(steps=4, starts=(0, 3), experts=("transformer", "transformer"))
    assert parse_multiplier("1;0.5").per_step_in(one) == [1, 1, 1, 0.5]


# -- samplers against hand-written references ----------------------------------------------------


def test_euler_is_lightx2v_and_lightning_distillation_sampling():
    from wan.engine.samplers import make_sampler
    ours = make_sampler("euler", 4, 5.0)
    # lightx2v WanStepDistillScheduler: shifted linspace(1, 0, 1001)[:-1] at indices 1000 - [1000, 750, 500, 250]
    table = torch.linspace(1.0, 0.0, 1001)[:-1]
    table = 5.0 * table / (1 + 4.0 * table)
    lightx2v = table[[0, 250, 500, 750]]
    # Wan2.2-Lightning EulerScheduler: linspace(1000, 0, N + 1) / 1000, shifted
    t = torch.linspace(1000, 0, 5) / 1000
    lightning = 5.0 * t / (1 + 4.0 * t)
    torch.testing.assert_close(ours.sigmas[:-1], lightx2v, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.sigmas, lightning, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.timesteps, lightning[:-1] * 1000, atol=1e-3, rtol=0)
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    for i in range(4):  # their steps: x0 = x - s v, then x0 + s' v (lightx2v), x + (s' - s) v (Lightning)
        s, s2 = ours.sigmas[i], ours.sigmas[i + 1]
        torch.testing.assert_close(ours.step(v, i, x), (x - s * v) + s2 * v, atol=1e-6, rtol=0)


def test_lcm_is_fastvideo_dmd_sampling():
    """FastVideo's DMD stage: x0 = x - (t/1000) v, then fresh noise at the next timestep."""
    from wan.engine.samplers import make_sampler
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(6, 6, generator=g) * 0.3

    def model(x, t):
        return torch.tanh(x @ weights) * (1 + t / 1000)
    ts, seed = [1000.0, 757.0, 522.0], 11
    x = torch.randn(2, 6, generator=g)
    ref, noise = x.clone(), torch.Generator().manual_seed(seed)
    for i, t in enumerate(ts):
        x0 = ref - t / 1000 * model(ref, t)
        if i < len(ts) - 1:
            s = ts[i + 1] / 1000
            ref = (1 - s) * x0 + s * torch.randn(ref.shape, generator=noise)
        else:
            ref = x0
    sampler = make_sampler("lcm", 3, 5.0, timesteps=ts, seed=seed)
    assert sampler.timesteps.tolist() == ts
    out = x.clone()
    for i, t in enumerate(sampler.timesteps):
        out = sampler.step(model(out, float(t)), i, out)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_cli_flags_have_wan2gp_names():
    from wan.cli_generate import add_arguments, base_request
    from wan.flags import FlagParser
    p = FlagParser(prog="generate")
    add_arguments(p)
    req = base_request(p.parse_args(["--model", "m", "--guidance_phases", "3", "--guidance2_scale", "1",
                                     "--guidance3_scale", "1", "--switch_threshold", "965", "--switch_threshold2",
                                     "800", "--model_switch_phase", "2", "--timesteps", "1000", "757", "522"]))
    assert (req.guidance_phases, req.guidance2_scale, req.guidance3_scale, req.switch_threshold,
            req.switch_threshold2, req.model_switch_phase, req.timesteps) == (3, 1.0, 1.0, 965.0, 800.0, 2,
                                                                              [1000.0, 757.0, 522.0])


def test_download_puts_an_accelerator_lora_where_its_profile_reads_it(tmp_path, monkeypatch):
    import wan.loading.download as dl
    from wan.lora.job import resolve_lora_path
    from wan.lora import LoraError
    entry = load_registry().loras["lightning-wan2.2-t2v-A14B"]
    req, _ = resolve_request(GenerationRequest(model="wan2.2-t2v-A14B", prompt="p", profile="lightning-4step"),
                             check_files=False)
    with pytest.raises(LoraError, match="python wgp.py download lightning-wan2.2-t2v-A14B"):
        resolve_lora_path(req.loras[0].path, tmp_path, names_only=True)
    monkeypatch.setattr(dl, "is_offline", lambda: True)
    with pytest.raises(dl.DownloadError, match=r"high_noise: .*high_noise_model.safetensors from lightx2v/Wan2.2-"
                                               r"Lightning\n    put it at: .*lightning-wan2.2-t2v-A14B-high_noise"):
        dl.fetch_lora_entry(entry, tmp_path, "wan2.2-a14b")
    fetched = []

    def hub(repo, filename, local_dir, force_download, progress, tqdm_class=None):
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"lora")
        fetched.append((repo, filename))
        return str(path)
    monkeypatch.setattr(dl, "is_offline", lambda: False)
    monkeypatch.setattr(dl, "hub_unreachable", lambda: None)
    monkeypatch.setattr(dl, "_hub_download", hub)
    paths = dl.fetch_lora_entry(entry, tmp_path, "wan2.2-a14b")
    folder = "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1"
    assert fetched == [("lightx2v/Wan2.2-Lightning", f"{folder}/{e}_noise_model.safetensors") for e in ("high", "low")]
    assert [resolve_lora_path(lo.path, tmp_path, names_only=True) for lo in req.loras] == \
        [p.resolve() for p in paths.values()]


def test_a_missing_accelerator_lora_is_downloaded_on_first_use(setup, tmp_path, monkeypatch):
    """A profile's LoRA missing from the LoRA folder is fetched before any model loads, into the name
    the recipe reads, and the job runs with it as with the file put there by hand; offline the job
    fails before loading, naming the file, its repo and where to put it."""
    import wan.loading.download as dl
    engine, registry = setup
    req = GenerationRequest(model="test-tiny-ti2v", prompt="a fox", seed=1, frames=5, steps=2,
                            profile="fastwan-3step")
    expected = engine.generate(req, write=False).latent
    loras = tmp_path / "loras"
    name = "test/accelerators/fastwan-test-ti2v.safetensors"
    fresh = Engine(checkpoint_dir=engine.models.checkpoint_dir, device="cpu", dtype=torch.float32,
                   registry=registry, lora_dir=loras)
    fresh.lora_names_only = True  # as in the web app: the fetched file is a name inside the folder
    monkeypatch.setattr(fresh.models, "get", lambda *a, **k: pytest.fail("a model loaded before the LoRA"))
    monkeypatch.setattr(dl, "is_offline", lambda: True)
    with pytest.raises(dl.DownloadError, match=r"fastwan-test-ti2v transformer: fastwan.safetensors from "
                                               r"test/none\n    put it at: " + re.escape(str(loras / name))):
        fresh.generate(req, write=False)
    fetched = []

    def hub(repo, filename, local_dir, force_download, progress, tqdm_class=None):
        fetched.append((repo, filename))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(engine.lora_dir / name, path)  # the file the Hub would serve
        return str(path)
    monkeypatch.undo()
    monkeypatch.setattr(dl, "is_offline", lambda: False)
    monkeypatch.setattr(dl, "hub_unreachable", lambda: None)
    monkeypatch.setattr(dl, "_hub_download", hub)
    result = fresh.generate(req, write=False)
    assert fetched == [("test/none", "fastwan.safetensors")] and (loras / name).is_file()
    assert torch.equal(result.latent, expected)
    assert f"accelerator LoRA fastwan-test-ti2v: downloaded into the LoRA folder ({loras / name})" in result.notices
    fresh.generate(req, write=False)
    assert len(fetched) == 1  # present now: not fetched again


def test_the_app_refuses_a_job_whose_accelerator_lora_cannot_come_offline(setup, tmp_path, monkeypatch):
    import wan.registry
    from wan.app.security import accept_request
    from wan.app.settings import ServerSettings
    from wan.app.state import AppState
    engine, registry = setup
    monkeypatch.setattr(wan.registry, "_default", registry)
    loras = tmp_path / "loras"
    state = AppState(ServerSettings(output_dir=str(tmp_path / "out"), state_dir=str(tmp_path / "state"),
                                    checkpoint_dir=str(engine.models.checkpoint_dir), lora_dir=str(loras)),
                     engine_factory=lambda: None)
    data = {"model": "test-tiny-t2v-a14b", "prompt": "a fox", "profile": "lightning-4step"}
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert accept_request(dict(data), state).profile == "lightning-4step"  # online: fetched on first use
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RequestError) as e:
        accept_request(dict(data), state)
    assert e.value.field == "loras" and "HF_HUB_OFFLINE is set" in str(e.value)
    assert (f"put high_noise_model.safetensors from test/none at "
            f"{loras / 'test/accelerators/lightning-test-a14b-high_noise.safetensors'}; and low_noise_model.safetensors"
            in str(e.value))
    for role in ("high_noise", "low_noise"):  # present: accepted offline
        (loras / "test/accelerators").mkdir(parents=True, exist_ok=True)
        shutil.copy(engine.lora_dir / f"test/accelerators/lightning-test-a14b-{role}.safetensors",
                    loras / f"test/accelerators/lightning-test-a14b-{role}.safetensors")
    assert accept_request(dict(data), state).profile == "lightning-4step"


def test_form_shows_the_phase_fields_that_apply_and_a_recipe_fills_them():
    from wan.app.form import form_to_requests, request_to_form
    from wan.app.ui_phases import PHASE_FIELDS, RECIPE_FIELDS, phase_updates, recipe_updates

    def shown(n, model):
        return {k for k, u in phase_updates(n, model).items() if u["visible"]}
    assert shown(None, "test-tiny-t2v") == set() and shown(None, "test-tiny-t2v-a14b") == {"switch_threshold",
                                                                                          "guidance2_scale"}
    assert shown(3, "test-tiny-t2v") == {"switch_threshold", "guidance2_scale", "switch_threshold2", "guidance3_scale"}
    assert shown(3, "test-tiny-t2v-a14b") == set(PHASE_FIELDS)
    assert recipe_updates("quality", "wan2.2-t2v-A14B") == {}
    # picking lightning-3phase puts its recipe in the form (boundary: its expert switch), which the job then runs
    recipe = {k: u["value"] for k, u in recipe_updates("lightning-3phase", "wan2.2-t2v-A14B").items()}
    assert set(recipe) == set(RECIPE_FIELDS) and recipe["boundary"] == 0.8
    (req,) = form_to_requests({"model": "wan2.2-t2v-A14B", "prompt": "p", "profile": "lightning-3phase", **recipe})
    form, _ = resolve_request(req, check_files=False)
    profile, _ = resolve_request(GenerationRequest(model="wan2.2-t2v-A14B", prompt="p", profile="lightning-3phase"),
                                 check_files=False)
    assert form.replace(seed=0, negative_prompt="") == profile.replace(seed=0, negative_prompt="")
    (back,) = form_to_requests(request_to_form(form))
    assert back == form  # loading an output's settings into the form keeps its phases and timesteps
