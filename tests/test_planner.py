"""The memory planner: parameter counts against the real networks built on the meta device, and
plans on made-up machines (fits within the budgets, or says which budget is short and by how
much, without loading anything)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wan.optim.planner import (
    CPU,
    GPU,
    MMAP,
    MOVED,
    STREAMED,
    VAE_PARAMS,
    GiB,
    Machine,
    MiB,
    ModelSize,
    describe,
    dit_parameter_counts,
    gb,
    model_sizes,
    plan,
    resolve_auto,
    run_precision,
    text_encoder_parameter_counts,
)
from wan.optim.profiles import apply_overrides
from wan.optim.profile_files import load_profiles
from wan.registry import get_model, list_models

REPO = Path(__file__).resolve().parents[1]
PROFILES = load_profiles(user_dir=None)
SMALL = Machine.from_gb(16, 8)   # 16 GB RAM, an 8 GB card


def sizes_14b(transformer: str = "bf16") -> list[ModelSize]:
    return model_sizes(get_model("wan2.1-t2v-14B"), transformer)


# ----------------------------------------------------------------------------- sizes


def _meta_counts(module: torch.nn.Module, keep_fp32=None) -> tuple[int, int]:
    """(parameters, bytes at bf16 with the keep-in-float32 parameters at 4 bytes)."""
    n = nbytes = 0
    for name, p in module.named_parameters():
        n += p.numel()
        nbytes += p.numel() * (4 if keep_fp32 and keep_fp32(name) else 2)
    return n, nbytes


@pytest.mark.parametrize("model_id", [m.id for m in list_models(include_test=False)])
def test_dit_formula_matches_the_network_built_on_meta(model_id):
    from wan.models.dit import DiTConfig, WanDiT
    spec = get_model(model_id)
    with torch.device("meta"):
        dit = WanDiT(DiTConfig(**spec.dit_config()))
    real_params, real_bytes = _meta_counts(dit, WanDiT.keep_in_fp32)
    rest, block, blocks = dit_parameter_counts(**spec.dit_config())
    formula = sum(blocks, rest)
    # The brief asks for 2%; the formula is exact, so the test asks for equality.
    assert abs(formula.total - real_params) / real_params <= 0.02
    assert formula.total == real_params
    assert block.total == sum(p.numel() for p in dit.blocks[0].parameters())
    size = model_sizes(spec, "bf16")[0]
    assert size.bytes == real_bytes and size.params == real_params
    assert size.blocks == spec.arch.num_layers + len(spec.arch.vace_layers or ())
    assert size.rest_bytes + sum(b.bytes("bf16") for b in blocks) == size.bytes


def test_dit_counts_of_the_public_sizes():
    """The three public shapes, counted on meta: 1.3B, 14B and the 5B TI2V."""
    from wan.models.dit import DiTConfig, WanDiT
    for model_id, expected in [("wan2.1-t2v-1.3B", 1_418_996_800), ("wan2.1-t2v-14B", 14_288_491_584),
                               ("wan2.2-ti2v-5B", 4_999_787_712)]:
        kwargs = get_model(model_id).dit_config()
        with torch.device("meta"):
            real = sum(p.numel() for p in WanDiT(DiTConfig(**kwargs)).parameters())
        rest, _, blocks = dit_parameter_counts(**kwargs)
        assert real == expected == sum(blocks, rest).total


def test_encoder_and_vae_sizes_match_the_networks():
    from wan.models.clip_vision import ClipDims, ClipVisionEncoder
    from wan.models.text_encoder import T5Dims, UMT5TextEncoder
    from wan.models.vae21 import WanVAE21
    from wan.models.vae22 import WanVAE22
    with torch.device("meta"):
        te = UMT5TextEncoder(T5Dims(256384, 4096, 4096, 10240, 64, 24))
        te.tie_embeddings()
        clip = ClipVisionEncoder(ClipDims(1280, 16, 32, 5120, 14, 224))
        vaes = {"2.1": WanVAE21(), "2.2": WanVAE22()}
    rest, block = text_encoder_parameter_counts(256384, 4096, 4096, 10240, 64, 24, 32)
    assert rest.total + 24 * block.total == sum(p.numel() for p in te.parameters()) == 5_680_910_336
    i2v = {s.name: s for s in model_sizes(get_model("wan2.1-i2v-14B-480P"), "bf16")}
    assert i2v["clip"].params == sum(p.numel() for p in clip.parameters())
    assert i2v["clip"].precision == "fp16" and i2v["text_encoder"].bytes == 2 * 5_680_910_336
    for version, vae in vaes.items():
        assert VAE_PARAMS[version] == sum(p.numel() for p in vae.parameters())


def test_quantisation_converts_the_block_matrices_only():
    bf16 = sizes_14b()[0]
    d, f, layers = 5120, 13824, 40
    matrices = layers * (8 * d * d + 2 * d * f)
    assert bf16.quant_params == matrices
    int8, fp8s = bf16.quantised("int8"), bf16.quantised("fp8_scaled")
    assert bf16.bytes - int8.bytes == matrices          # 2 bytes -> 1 byte per matrix weight
    assert fp8s.bytes - int8.bytes == round(matrices * 4 / 64)  # float32 scale per 64 inputs
    assert int8.rest_bytes == bf16.rest_bytes and int8.quantised("fp8") is int8  # 8-bit stays as is
    assert model_sizes(get_model("wan2.1-t2v-14B"), "int8")[0].bytes == int8.bytes
    assert sizes_14b()[1].quantised("int8").bytes == 2 * 256384 * 4096 + 4096 * 2 + 24 * (
        4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * (64 * 32 + 2 * 4096))  # umT5: embedding stays bf16


def test_run_precision():
    auto = PROFILES.get("default")
    assert run_precision(auto, Machine.from_gb(32)) == "fp32"
    assert run_precision(auto, Machine(32 * GiB, 24 * GiB, "A", (8, 9))) == "bf16"
    assert run_precision(auto, Machine(32 * GiB, 16 * GiB, "V100", (7, 0))) == "fp16"
    assert run_precision(apply_overrides(auto, {"precision": "fp16"}), SMALL) == "fp16"


# ----------------------------------------------------------------------------- plans


def check_budgets(p, machine):
    """What a plan that fits must respect, recomputed from its placements."""
    ram = sum(x.ram_bytes for x in p.placements)
    assert ram == p.ram_total and ram + p.ram_reserve <= machine.ram_bytes
    assert p.pinned_total <= machine.ram_bytes // 2
    if machine.has_gpu:
        for phase, vram in p.phases:
            assert vram + p.vram_reserve <= machine.vram_bytes, phase
        for x in p.placements:
            if x.mode in (STREAMED, MMAP):
                assert x.resident_blocks * x.block_bytes <= x.budget_bytes
                assert x.gpu_bytes <= x.bytes


def expected_shortfalls(p, machine):
    """Shortfalls recomputed independently: {resource: bytes short}."""
    out = {}
    if machine.has_gpu and p.vram_peak + p.vram_reserve > machine.vram_bytes:
        out["VRAM"] = p.vram_peak + p.vram_reserve - machine.vram_bytes
    ram = sum(x.ram_bytes for x in p.placements)
    if ram + p.ram_reserve > machine.ram_bytes:
        out["RAM"] = ram + p.ram_reserve - machine.ram_bytes
    return out


@pytest.mark.parametrize("quant", ["none", "int8", "fp8"])
@pytest.mark.parametrize("key", [1, 2, 3, 4, 5, "auto"])
def test_14b_on_8gb_vram_16gb_ram(key, quant):
    profile = apply_overrides(PROFILES.get(key), {"quantize.transformer": quant})
    p = plan(profile, sizes_14b(), SMALL, PROFILES)
    text = describe(p)
    short = expected_shortfalls(p, SMALL)
    assert {s.resource: s.short_by for s in p.shortfalls} == short
    if p.fits:
        check_budgets(p, SMALL)
        assert text.splitlines()[0].endswith(": fits")
    else:
        assert "does NOT fit" in text.splitlines()[0]
        for s in p.shortfalls:
            assert f"{s.resource} short by {gb(s.short_by)}: " in text
            assert f"minus {gb(p.ram_reserve if s.resource == 'RAM' else p.vram_reserve)} reserve" in str(s)


def test_14b_bf16_on_small_machine_what_fits_and_what_is_short():
    sizes = sizes_14b()
    dit = sizes[0]
    one = plan(PROFILES.get(1), sizes, SMALL)
    assert {s.resource for s in one.shortfalls} == {"VRAM", "RAM"}
    vram = one.shortfalls[0]
    assert vram.resource == "VRAM" and vram.short_by == dit.bytes + 2048 * MiB - 8 * GiB
    assert "while denoising, transformer 27.0 GB" in str(vram)
    ram = next(s for s in one.shortfalls if s.resource == "RAM")
    assert ram.short_by == sum(s.bytes for s in sizes) + 2048 * MiB - 16 * GiB
    assert str(ram).startswith("RAM short by 24.0 GB: transformer bf16 27.0 GB + text_encoder bf16 10.6 GB")
    # Profile 4 streams the DiT (fits the card) but holds it in RAM: RAM short only.
    four = plan(PROFILES.get(4), sizes, SMALL)
    assert [s.resource for s in four.shortfalls] == ["RAM"]
    assert four.placement("transformer").mode == STREAMED and four.placement("transformer").resident_blocks == 0
    # Profile 5 reads the DiT from its file: fits, and RAM holds only the streaming buffers of it.
    five = plan(PROFILES.get(5), sizes, SMALL)
    assert five.fits
    t = five.placement("transformer")
    assert t.mode == MMAP and t.in_flight_blocks == 2 and t.ram_bytes == dit.rest_bytes + 2 * dit.block_bytes
    assert five.placement("text_encoder").quantised == "int8" and five.pinned_total == 0
    auto = plan(PROFILES.get("auto"), sizes, SMALL, PROFILES)
    assert auto.profile == "auto -> 5 VeryLowRAM_LowVRAM" and "1, 3, 2, 4 do not" in auto.chosen_by


def test_prequantised_file_is_streamed_from_disk_but_quantised_at_load_is_held():
    fp8 = plan(apply_overrides(PROFILES.get(5), {"quantize.transformer": "fp8"}), sizes_14b(), SMALL)
    int8 = plan(apply_overrides(PROFILES.get(5), {"quantize.transformer": "int8"}), sizes_14b(), SMALL)
    assert fp8.placement("transformer").prequantized_file and fp8.placement("transformer").mode == MMAP and fp8.fits
    t = int8.placement("transformer")
    assert not t.prequantized_file and t.mode == STREAMED and t.ram_bytes == t.bytes and not int8.fits
    assert "int8 from bf16, quantised at load: 27.0 GB -> 13.9 GB" in describe(int8)
    no_prefer = apply_overrides(PROFILES.get(5), {"quantize": {"transformer": "fp8", "prefer_prequantized": False}})
    assert plan(no_prefer, sizes_14b(), SMALL).placement("transformer").mode == STREAMED


def test_cpu_only_machine_plans_ram():
    cpu = Machine.from_gb(24)
    sizes = model_sizes(get_model("wan2.1-t2v-14B"), run_precision(PROFILES.get(5), cpu))
    assert sizes[0].precision == "fp32"
    one = plan(PROFILES.get(1), sizes, cpu)
    assert [s.resource for s in one.shortfalls] == ["RAM"] and one.vram_peak == 0 and one.phases == ()
    assert all(x.mode == CPU for x in one.placements) and "pinning needs a GPU" in describe(one)
    five = plan(PROFILES.get(5), sizes, cpu)
    t = five.placement("transformer")
    assert five.fits and t.mode == MMAP and t.gpu_bytes == 0
    assert t.ram_bytes == sizes[0].rest_bytes + 2 * sizes[0].block_bytes  # prefetch 1: two blocks
    deeper = plan(apply_overrides(PROFILES.get(5), {"memory.prefetch_blocks": 3}), sizes, cpu)
    assert deeper.placement("transformer").ram_bytes == sizes[0].rest_bytes + 4 * sizes[0].block_bytes
    check_budgets(five, cpu)
    # offload auto: 24 GB cannot hold the float32 text encoder (21.2 GB) next to the streaming DiT; 32 GB can
    assert [s.resource for s in plan(PROFILES.get("default"), sizes, cpu).shortfalls] == ["RAM"]
    default = plan(PROFILES.get("default"), sizes, Machine.from_gb(32))
    assert default.offload == "blocks" and default.fits and default.placement("transformer").mode == MMAP


def test_two_experts_only_one_on_the_gpu_at_a_time():
    sizes = model_sizes(get_model("wan2.2-t2v-A14B"), "bf16")
    dit = sizes[0]
    machine = Machine.from_gb(128, 32)
    moved = plan(PROFILES.get(1), sizes, machine)
    phases = dict(moved.phases)
    assert phases["denoising (high-noise expert)"] == phases["denoising (low-noise expert)"] == dit.bytes
    assert moved.placement("transformer_low_noise").mode == MOVED
    assert moved.ram_total >= 2 * dit.bytes and moved.pinned_total == 64 * GiB  # half the RAM
    streamed = plan(PROFILES.get(4), sizes, Machine.from_gb(64, 12))
    assert streamed.fits
    check_budgets(streamed, Machine.from_gb(64, 12))
    assert dict(streamed.phases)["denoising (low-noise expert)"] == dit.rest_bytes + 2 * dit.block_bytes
    resident = plan(apply_overrides(PROFILES.get(1), {"memory.offload": "none"}), sizes, Machine.from_gb(128, 141))
    assert resident.fits and all(x.mode == GPU for x in resident.placements)
    assert resident.vram_peak == sum(s.bytes for s in sizes)  # none: both experts stay on the GPU


def test_budgets_blocks_to_swap_and_free_vram():
    sizes = sizes_14b()
    dit = sizes[0]
    big = Machine.from_gb(128, 40)
    swap = plan(apply_overrides(PROFILES.get(2), {"memory.blocks_to_swap": 10}), sizes, big)
    t = swap.placement("transformer")
    assert (t.resident_blocks, t.in_flight_blocks, t.budget_source) == (30, 2, "blocks_to_swap")
    assert "10 blocks swapped: 30 of 40 blocks resident" in describe(swap)
    budget = plan(apply_overrides(PROFILES.get(2), {"memory.transformer_budget_mb": 5000}), sizes, big)
    assert budget.placement("transformer").resident_blocks == 5000 * MiB // dit.block_bytes
    card = Machine.from_gb(128, 24)
    free = plan(apply_overrides(PROFILES.get(2), {"memory.transformer_budget_mb": None}), sizes, card)
    t = free.placement("transformer")
    left = 24 * GiB - 2048 * MiB - dit.rest_bytes - 2 * dit.block_bytes
    assert t.budget_source == "free VRAM" and t.resident_blocks == left // dit.block_bytes < 40
    check_budgets(free, card)
    whole = plan(apply_overrides(PROFILES.get(2), {"memory.transformer_budget_mb": None}), sizes, big)
    t = whole.placement("transformer")
    assert (t.resident_blocks, t.in_flight_blocks, t.gpu_bytes) == (40, 0, dit.bytes)
    sync = plan(apply_overrides(PROFILES.get(4), {"memory.async_transfers": False}), sizes, big)
    assert sync.placement("transformer").in_flight_blocks == 1  # no prefetch without async copies


def test_offload_auto_takes_the_fastest_layout_that_fits():
    sizes = sizes_14b()
    assert plan(PROFILES.get("default"), sizes, Machine.from_gb(128, 80)).offload == "none"
    assert plan(PROFILES.get("default"), sizes, Machine.from_gb(128, 40)).offload == "model"
    mid = plan(PROFILES.get("default"), sizes, Machine.from_gb(64, 12))
    assert mid.offload == "blocks" and mid.fits and "none, model did not fit" in mid.notes[0]


@pytest.mark.parametrize("ram, vram, number", [(16, 8, 5), (29, 24, 5), (31.3, 24, 3), (32, 12, 4), (64, 12, 2),
                                                (48, 24, 3), (62.7, 23.6, 1), (128, None, 2)])
def test_auto_by_machine_alone(ram, vram, number):
    _, chosen, why = resolve_auto(PROFILES.get("auto"), [], Machine.from_gb(ram, vram), PROFILES)
    assert chosen.number == number and why.startswith("by memory alone")


def test_auto_keeps_its_own_settings_and_picks_by_fit():
    auto = apply_overrides(PROFILES.get("auto"), {"quantize.transformer": "fp8", "memory.prefetch_blocks": 2})
    resolved, chosen, _ = resolve_auto(auto, sizes_14b(), SMALL, PROFILES)
    assert chosen.number == 5 and resolved.quantize.transformer == "fp8" and resolved.memory.prefetch_blocks == 2
    assert resolved.memory.pin == "none" and resolved.quantize.text_encoder == "int8"
    _, chosen, _ = resolve_auto(PROFILES.get("auto"), sizes_14b(), Machine.from_gb(128, 48), PROFILES)
    assert chosen.number == 1
    _, chosen, why = resolve_auto(PROFILES.get("auto"), sizes_14b(), Machine.from_gb(4, 2), PROFILES)
    assert chosen.number == 5 and "none of the numbered profiles fits" in why


def test_planning_imports_no_torch():
    """The planner runs before anything loads: planning a job must not even import torch."""
    code = ("import sys\n"
            "from wan.optim.planner import Machine, describe, model_sizes, plan\n"
            "from wan.optim.profile_files import load_profiles\n"
            "from wan.registry import get_model\n"
            "ps = load_profiles(user_dir=None)\n"
            "describe(plan(ps.get('auto'), model_sizes(get_model('wan2.1-t2v-14B')), Machine.from_gb(16, 8), ps))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ----------------------------------------------------------------------------- command and machine


def test_profiles_command_prints_every_profile_and_its_plan(capsys):
    from wan.cli_profiles import add_arguments, run
    from wan.flags import FlagParser
    parser = FlagParser()  # the hyphen spellings below still parse
    add_arguments(parser)
    assert run(parser.parse_args(["--ram-gb", "16", "--vram-gb", "8"])) == 0
    out = capsys.readouterr().out
    assert out.startswith("Model wan2.1-t2v-14B (") and "16.0 GB RAM, 8.0 GB VRAM" in out
    for profile in PROFILES:
        assert f"[{profile.label}] {profile.description}" in out
    assert "Profile auto -> 5 VeryLowRAM_LowVRAM" in out and "RAM short by" in out
    assert run(parser.parse_args(["--model", "wan2.2-t2v-A14B", "--vram-gb", "0"])) == 0
    out = capsys.readouterr().out
    assert "no GPU" in out and "transformer_high_noise (14.3B DiT, high-noise expert, fp32" in out
    assert run(parser.parse_args(["--model", "wan9-nothing"])) == 2
    assert "unknown model id 'wan9-nothing'" in capsys.readouterr().err


def test_detect_machine():
    import psutil

    from wan.optim.machine import detect_machine
    m = detect_machine()
    assert m.ram_bytes == psutil.virtual_memory().total
    assert m.has_gpu == torch.cuda.is_available()
