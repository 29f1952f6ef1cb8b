"""LoRA formats: every key layout reads to the same adapters; delta formulas; compatibility; conversion.

Each test writes its own LoRA file in the exact public key layout with safetensors, using tiny
random tensors.
"""
import pytest
import torch
from safetensors.torch import save_file

from wan.loading.files import CheckpointError
from wan.lora.compat import check_lora, linear_shapes
from wan.lora.convert import save_lora, to_comfy, to_diffusers, to_musubi
from wan.lora.formats import LoraWeights, load_lora
from wan.models.dit import DiTConfig, WanDiT

DIM, FFN, RANK = 256, 64, 4
T2V = DiTConfig(dim=DIM, ffn_dim=FFN, num_heads=2, num_layers=2, freq_dim=32, text_dim=16)
I2V = DiTConfig(dim=DIM, ffn_dim=FFN, num_heads=2, num_layers=2, freq_dim=32, text_dim=16, image_dim=32)


def model_shapes(cfg: DiTConfig) -> dict:
    with torch.device("meta"):
        return linear_shapes(WanDiT(cfg))


def factors(out_dim: int, in_dim: int, rank: int = RANK, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_dim, generator=g), torch.randn(out_dim, rank, generator=g)


# official module -> (down, up); alpha shared
MODULES = {
    "blocks.0.self_attn.q": factors(DIM, DIM, seed=1),
    "blocks.1.cross_attn.o": factors(DIM, DIM, seed=2),
    "blocks.1.ffn.0": factors(FFN, DIM, seed=3),
    "head.head": factors(64, DIM, seed=4),
}
ALPHA = 2.0
DIFFUSERS_NAMES = {"blocks.0.self_attn.q": "blocks.0.attn1.to_q", "blocks.1.cross_attn.o": "blocks.1.attn2.to_out.0",
                   "blocks.1.ffn.0": "blocks.1.ffn.net.0.proj", "head.head": "proj_out"}


def layouts() -> dict[str, dict[str, torch.Tensor]]:
    """The same adapters written in each public key layout."""
    alpha = torch.tensor(ALPHA)
    out = {"musubi": {}, "comfy": {}, "comfy_bare_updown": {}, "diffusers": {}, "diffusers_default": {}}
    for name, (down, up) in MODULES.items():
        m = "lora_unet_" + name.replace(".", "_")
        out["musubi"].update({f"{m}.lora_down.weight": down, f"{m}.lora_up.weight": up, f"{m}.alpha": alpha})
        c = "diffusion_model." + name
        out["comfy"].update({f"{c}.lora_A.weight": down, f"{c}.lora_B.weight": up, f"{c}.alpha": alpha})
        out["comfy_bare_updown"].update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                                         f"{name}.alpha": alpha})
        d = "transformer." + DIFFUSERS_NAMES[name]
        out["diffusers"].update({f"{d}.lora_A.weight": down, f"{d}.lora_B.weight": up})
        out["diffusers_default"].update({f"{d}.lora_A.default.weight": down, f"{d}.lora_B.default.weight": up})
    return out


def write(tmp_path, name, state, metadata=None):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("layout", ["musubi", "comfy", "comfy_bare_updown", "diffusers", "diffusers_default"])
def test_each_layout_reads_to_the_same_adapters(tmp_path, layout):
    lora = load_lora(write(tmp_path, layout, layouts()[layout], {"ss_network_dim": "4"}))
    assert lora.format == layout.split("_")[0]
    assert set(lora.targets) == set(MODULES) and lora.dropped == []
    assert lora.metadata == {"ss_network_dim": "4"}
    has_alpha = not layout.startswith("diffusers")  # PEFT files carry no alpha key
    for name, (down, up) in MODULES.items():
        w = lora.targets[name]
        assert w.kind == "lora" and torch.equal(w.down, down) and torch.equal(w.up, up)
        assert w.alpha == (ALPHA if has_alpha else None)


def test_musubi_underscores_resolve_against_the_official_module_list(tmp_path):
    # self_attn_q must not be read as self.attn_q, cross_attn_k_img must not stop at cross_attn.k,
    # and a text-encoder key is dropped with its reason rather than misread.
    down, up = factors(DIM, DIM)
    state = {}
    for m in ("lora_unet_blocks_0_cross_attn_k_img", "lora_unet_blocks_0_cross_attn_k",
              "lora_unet_blocks_0_self_attn_norm_q", "lora_te_text_model_encoder_layers_0_q"):
        state.update({f"{m}.lora_down.weight": down, f"{m}.lora_up.weight": up})
    lora = load_lora(write(tmp_path, "m", state))
    assert set(lora.targets) == {"blocks.0.cross_attn.k_img", "blocks.0.cross_attn.k", "blocks.0.self_attn.norm_q"}
    assert len(lora.dropped) == 2 and all("lora_te_" in d and "not part of the Wan DiT" in d for d in lora.dropped)


def test_lora_delta_uses_alpha_over_rank():
    down, up = factors(6, 5, rank=3)
    ref = torch.zeros(6, 5)
    for i in range(6):            # by hand: sum over the rank
        for j in range(5):
            ref[i, j] = sum(up[i, r] * down[r, j] for r in range(3))
    got = LoraWeights("lora", down=down, up=up, alpha=1.5).delta((6, 5))
    assert (got - ref * (1.5 / 3)).abs().max() / ref.abs().max() <= 1e-6
    assert (LoraWeights("lora", down=down, up=up).delta((6, 5)) - ref).abs().max() / ref.abs().max() <= 1e-6


def test_loha_delta_from_lycoris_keys(tmp_path):
    g = torch.Generator().manual_seed(5)
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in ((6, 2), (2, 5), (6, 2), (2, 5)))
    m = "lora_unet_blocks_0_self_attn_v"
    lora = load_lora(write(tmp_path, "loha", {f"{m}.hada_w1_a": w1a, f"{m}.hada_w1_b": w1b, f"{m}.hada_w2_a": w2a,
                                              f"{m}.hada_w2_b": w2b, f"{m}.alpha": torch.tensor(1.0)}))
    assert lora.format == "lycoris" and lora.naming == "musubi"
    w = lora.targets["blocks.0.self_attn.v"]
    ref = torch.zeros(6, 5)
    for i in range(6):
        for j in range(5):
            ref[i, j] = (w1a[i] @ w1b[:, j]) * (w2a[i] @ w2b[:, j]) * (1.0 / 2)
    assert w.kind == "loha" and (w.delta((6, 5)) - ref).abs().max() / ref.abs().max() <= 1e-6


def test_lokr_delta_from_lycoris_keys(tmp_path):
    g = torch.Generator().manual_seed(6)
    w1 = torch.randn(2, 3, generator=g)                       # full first factor
    w2a, w2b = torch.randn(4, 2, generator=g), torch.randn(2, 5, generator=g)  # second as a product
    c = "diffusion_model.blocks.1.ffn.2"
    lora = load_lora(write(tmp_path, "lokr", {f"{c}.lokr_w1": w1, f"{c}.lokr_w2_a": w2a, f"{c}.lokr_w2_b": w2b,
                                              f"{c}.alpha": torch.tensor(3.0)}))
    w = lora.targets["blocks.1.ffn.2"]
    w2 = w2a @ w2b
    ref = torch.zeros(8, 15)
    for a in range(2):                                        # Kronecker product block by block
        for b in range(3):
            ref[a * 4:(a + 1) * 4, b * 5:(b + 1) * 5] = w1[a, b] * w2
    ref *= 3.0 / 2                                            # alpha / rank of the decomposed factor
    assert w.kind == "lokr" and w.weight_shape() == (8, 15)
    assert (w.delta((8, 15)) - ref).abs().max() / ref.abs().max() <= 1e-6


def test_full_and_bias_deltas_and_dora(tmp_path):
    g = torch.Generator().manual_seed(7)
    diff, diff_b, norm_diff = torch.randn(DIM, DIM, generator=g), torch.randn(DIM, generator=g), torch.randn(DIM, generator=g)
    down, up = factors(DIM, DIM)
    dora = torch.rand(DIM, 1, generator=g)
    state = {"diffusion_model.blocks.0.self_attn.k.diff": diff, "diffusion_model.blocks.0.self_attn.k.diff_b": diff_b,
             "diffusion_model.blocks.0.norm3.diff": norm_diff,
             "diffusion_model.blocks.0.self_attn.o.lora_down.weight": down,
             "diffusion_model.blocks.0.self_attn.o.lora_up.weight": up,
             "diffusion_model.blocks.0.self_attn.o.dora_scale": dora,
             "diffusion_model.blocks.0.self_attn.o.diff_b": diff_b}
    lora = load_lora(write(tmp_path, "full", state))
    k, n, o = (lora.targets[f"blocks.0.{m}"] for m in ("self_attn.k", "norm3", "self_attn.o"))
    assert k.kind == "full" and torch.equal(k.delta((DIM, DIM)), diff) and torch.equal(k.diff_b, diff_b)
    assert n.kind == "full" and torch.equal(n.delta((DIM,)), norm_diff)
    assert o.kind == "lora" and torch.equal(o.dora_scale, dora) and torch.equal(o.diff_b, diff_b)
    assert check_lora(lora, model_shapes(T2V)).status == "full"


def test_i2v_keys_dropped_on_t2v_model_with_notice(tmp_path):
    down, up = factors(DIM, DIM)
    state = {}
    for m in ("blocks.0.self_attn.q", "blocks.0.cross_attn.k_img", "blocks.0.cross_attn.v_img"):
        state.update({f"diffusion_model.{m}.lora_A.weight": down, f"diffusion_model.{m}.lora_B.weight": up})
    lora = load_lora(write(tmp_path, "i2v", state))
    on_t2v = check_lora(lora, model_shapes(T2V))
    assert (on_t2v.status, on_t2v.matched, on_t2v.total) == ("full", 1, 1)
    assert sorted(on_t2v.dropped_i2v) == ["blocks.0.cross_attn.k_img", "blocks.0.cross_attn.v_img"]
    assert "image cross-attention adapters dropped" in on_t2v.summary()
    on_i2v = check_lora(lora, model_shapes(I2V))
    assert (on_i2v.status, on_i2v.matched, on_i2v.total, on_i2v.dropped_i2v) == ("full", 3, 3, [])


def test_lora_for_another_family_is_none_with_guess(tmp_path):
    down, up = factors(512, 512)
    m = "lora_unet_blocks_0_self_attn_q"
    lora = load_lora(write(tmp_path, "big", {f"{m}.lora_down.weight": down, f"{m}.lora_up.weight": up}))
    result = check_lora(lora, model_shapes(T2V))
    assert result.status == "none" and result.matched == 0
    assert result.mismatched == [("blocks.0.self_attn.q", (512, 512), (DIM, DIM))]
    assert "width 512" in result.guess
    with pytest.raises(ValueError, match="big.safetensors.*not compatible"):
        result.require()
    # real widths are named
    down, up = factors(1536, 1536)
    lora = load_lora(write(tmp_path, "w13", {f"{m}.lora_down.weight": down, f"{m}.lora_up.weight": up}))
    assert "1.3B" in check_lora(lora, model_shapes(T2V)).guess


def test_partly_matching_lora_reports_its_count(tmp_path):
    state = {}
    for name, (down, up) in {"blocks.0.self_attn.q": factors(DIM, DIM), "blocks.1.ffn.0": factors(FFN, DIM),
                             "blocks.0.self_attn.k": factors(DIM, 128),      # wrong in_dim
                             "blocks.7.self_attn.q": factors(DIM, DIM)}.items():  # model has 2 blocks
        state.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
    result = check_lora(load_lora(write(tmp_path, "part", state)), model_shapes(T2V))
    assert (result.status, result.matched, result.total) == ("partial", 2, 4)
    assert result.missing == ["blocks.7.self_attn.q"]
    assert [m[0] for m in result.mismatched] == ["blocks.0.self_attn.k"]
    assert "2/4" in result.summary()


def test_corrupted_or_foreign_files_raise_clear_errors(tmp_path):
    good = write(tmp_path, "good", layouts()["musubi"])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_lora(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_lora(garbage)
    not_lora = write(tmp_path, "model", {"blocks.0.self_attn.q.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="model.safetensors: not a LoRA"):
        load_lora(not_lora)
    assert load_lora(good).targets  # the other LoRAs still load


def test_convert_round_trip_musubi_comfy_musubi_keeps_every_tensor(tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in layouts()["musubi"].items()}  # bf16, alpha too
    g = torch.Generator().manual_seed(9)
    m = "lora_unet_blocks_1_self_attn_k"
    state.update({f"{m}.hada_w1_a": torch.randn(DIM, 2, generator=g), f"{m}.hada_w1_b": torch.randn(2, DIM, generator=g),
                  f"{m}.hada_w2_a": torch.randn(DIM, 2, generator=g), f"{m}.hada_w2_b": torch.randn(2, DIM, generator=g),
                  f"{m}.alpha": torch.tensor(1.0)})
    m = "lora_unet_blocks_1_self_attn_v"
    state.update({f"{m}.lokr_w1": torch.randn(4, 4, generator=g), f"{m}.lokr_w2_a": torch.randn(64, 2, generator=g),
                  f"{m}.lokr_w2_b": torch.randn(2, 64, generator=g)})
    m = "lora_unet_blocks_0_cross_attn_q"
    state.update({f"{m}.lora_down.weight": torch.randn(RANK, DIM), f"{m}.lora_up.weight": torch.randn(DIM, RANK),
                  f"{m}.dora_scale": torch.rand(DIM, 1), f"{m}.diff_b": torch.randn(DIM)})
    state["lora_unet_blocks_0_norm3.diff"] = torch.randn(DIM)
    src = load_lora(write(tmp_path, "src", state, {"ss_output_name": "x"}))
    save_lora(to_comfy(src), tmp_path / "comfy.safetensors", src.metadata)
    comfy = load_lora(tmp_path / "comfy.safetensors")
    assert comfy.naming == "comfy" and comfy.metadata == {"ss_output_name": "x"}
    save_lora(to_musubi(comfy), tmp_path / "back.safetensors", comfy.metadata)
    back = load_lora(tmp_path / "back.safetensors")
    from safetensors.torch import load_file
    written = load_file(str(tmp_path / "back.safetensors"))
    assert set(written) == set(state)
    for k, v in state.items():
        assert written[k].dtype == v.dtype and torch.equal(written[k], v), k
    assert {n: w.alpha for n, w in back.targets.items()} == {n: w.alpha for n, w in src.targets.items()}


def test_to_diffusers_keeps_the_delta(tmp_path):
    src = load_lora(write(tmp_path, "m", layouts()["musubi"]))
    save_lora(to_diffusers(src), tmp_path / "d.safetensors")
    d = load_lora(tmp_path / "d.safetensors")
    assert d.format == "diffusers" and set(d.targets) == set(src.targets)
    for name, w in src.targets.items():
        shape = w.weight_shape()
        ref = w.delta(shape)
        assert (d.targets[name].delta(shape) - ref).abs().max() / ref.abs().max() <= 1e-6
