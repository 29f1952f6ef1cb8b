"""Weight quantisation (wan.optim.quant): accuracy against the unquantised model, memory, what is
kept, pre-quantised ComfyUI tensors, the _scaled_mm path (run on CPU, which torch 2.13 allows).

Accuracy is measured as in the rest of the suite, max |ours - ref| / max |ref| (tests/helpers.py),
on the output of a whole tiny DiT or text encoder against the same model unquantised in the same
dtype. Tolerances are set from what 8 bits can do, with headroom over the measured values (in
comments), so a wrong scale or a wrong layout fails by orders of magnitude:
  - e4m3 keeps 3 mantissa bits: each weight is off by up to 2^-4 = 6.25% of itself (less than half
    of that on average); errors of many weights partly cancel in a dot product -> 4% on the output.
  - int8 with one scale per output row: each weight is off by up to amax/254 (0.4% of the row's
    largest weight) -> 0.8% on the output (a scale twice too coarse already gives 1%).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import wan
from helpers import randomize_, rel_err
from wan.loading.files import open_checkpoint, weight_reader
from wan.models.dit import DiTConfig, WanDiT
from wan.layers.quant import (FP8, QUANT_MODES, QuantLinear, compute_dtype_of, quantize_fp8, quantize_fp8_blockwise,
                              scaled_mm_linear, select_matmul)
from wan.optim.quant import (is_prequantized, keep_from_traits, load_quantized_linear_from, module_bytes,
                             prequantized_mode, quantize_)
from wan.testing.tiny_encoders import TINY_T5, tiny_t5_state_dict

HEADS = 2
# dim and ffn are multiples of the 64-wide fp8 blocks; text_dim 24 is not, so the text embedding
# takes the one-scale-per-row fallback.
CFG = DiTConfig(dim=128, ffn_dim=256, num_heads=HEADS, num_layers=2, freq_dim=32, text_dim=24)
# measured (fp32 / bf16 DiT): fp8 0.019 / 0.023, fp8_scaled 0.019 / 0.018, int8 0.0041 / 0.0054
TOL = {"fp8": 4e-2, "fp8_scaled": 4e-2, "int8": 8e-3}


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    """Random DiT weights in the official layout, float32, written once."""
    path = tmp_path_factory.mktemp("quant") / "dit.safetensors"
    model = randomize_(WanDiT(CFG), seed=0, std=0.1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_dit(path, dtype) -> WanDiT:
    """Through the real loader: bf16 weights with norms, modulation, head in float32."""
    return wan.load_transformer(path, num_heads=HEADS, dtype=dtype)


def dit_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([500.0]),
            torch.randn(1, 7, CFG.text_dim, generator=g))


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# ---------------------------------------------------------------------------------------------
# Accuracy and memory on the DiT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["fp8", "fp8_scaled", "int8"])
def test_dit_output_close_to_unquantised(dit_file, dtype, mode):
    model = load_dit(dit_file, dtype)
    quant = copy.deepcopy(model)
    report = quantize_(quant, mode, keep=WanDiT.keep_in_fp32)
    x, t, ctx = dit_inputs()
    with torch.no_grad():
        ref, out = model(x, t, ctx), quant(x, t, ctx)
    err = rel_err(out, ref)
    assert err <= TOL[mode], f"{mode} {dtype}: {err:.4f}"
    assert err > 0  # the quantised layers really ran
    # every linear outside keep() was replaced: 2 blocks x (4 self + 4 cross + 2 ffn) + text_embedding 2
    assert report.quantized == 22 and report.kept == 4
    assert all(isinstance(quant.get_submodule(n), QuantLinear) for n in linear_names(model)
               if not WanDiT.keep_in_fp32(n))


def expected_ratio(model: nn.Module, mode: str, src_bytes: int, block=64) -> float:
    """Bytes of the replaced layers before / after, from the formats' definitions: the weight goes
    from src_bytes to 1 byte per value plus float32 scales; the bias keeps its dtype."""
    before = after = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not WanDiT.keep_in_fp32(name):
            o, i = m.weight.shape
            n_scales = {"fp8": 0, "int8": o, "fp8_scaled": o * (i // block if i % block == 0 else 1)}[mode]
            before += (o * i + o) * src_bytes
            after += o * i + 4 * n_scales + o * src_bytes
    return before / after


@pytest.mark.parametrize("dtype, mode, lo, hi", [
    (torch.bfloat16, "fp8", 1.95, 2.0),          # 2 bytes -> 1 byte; biases stay bf16
    (torch.bfloat16, "fp8_scaled", 1.8, 1.9),    # + one float32 scale per 64 weights (4/64 byte)
    (torch.float32, "int8", 3.7, 4.0),           # 4 bytes -> 1 byte + one float32 scale per row
])
def test_weight_memory_drops_by_expected_ratio(dit_file, dtype, mode, lo, hi):
    model = load_dit(dit_file, dtype)
    want = expected_ratio(model, mode, torch.empty((), dtype=dtype).element_size())
    before = module_bytes(model)
    report = quantize_(model, mode, keep=WanDiT.keep_in_fp32)
    assert report.ratio == pytest.approx(want, rel=1e-12)
    assert lo <= report.ratio <= hi
    assert report.bytes_before == before and report.bytes_after == module_bytes(model)
    assert before - report.bytes_after == report.linear_bytes_before - report.linear_bytes_after


def test_keep_leaves_high_precision_modules_untouched(dit_file):
    model = load_dit(dit_file, torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = {n: model.get_submodule(n) for n in linear_names(model) if WanDiT.keep_in_fp32(n)}
    report = quantize_(model, "fp8_scaled", keep=keep_from_traits(model))
    assert sorted(report.kept_names) == sorted(kept) == sorted(
        ["time_embedding.0", "time_embedding.2", "time_projection.1", "head.head"])
    for name, layer in kept.items():
        assert model.get_submodule(name) is layer and layer.weight.dtype == torch.float32
    after = model.state_dict()
    fp32_keys = [k for k in before if WanDiT.keep_in_fp32(k)]
    assert any("norm3" in k for k in fp32_keys) and any("modulation" in k for k in fp32_keys)
    for k in fp32_keys:  # norms, modulation, head, time embedding: same values, float32
        assert after[k].dtype == torch.float32 and torch.equal(after[k], before[k]), k


def test_quantised_model_is_deterministic(dit_file):
    model = load_dit(dit_file, torch.float32)
    quantize_(model, "fp8_scaled", keep=WanDiT.keep_in_fp32)
    again = load_dit(dit_file, torch.float32)
    quantize_(again, "fp8_scaled", keep=WanDiT.keep_in_fp32)
    x, t, ctx = dit_inputs()
    with torch.no_grad():
        first, second, third = model(x, t, ctx), model(x, t, ctx), again(x, t, ctx)
    assert torch.equal(first, second) and torch.equal(first, third)


def test_scaled_beats_plain_fp8_on_outlier_weights(dit_file):
    """Realistic small weights (std 0.02: many below e4m3's smallest normal, 2^-6) plus a few
    outliers beyond its largest value (448): a plain cast flushes the first to coarse subnormals and
    clamps the second; block scales keep both. Measured: plain 1.9e-3, scaled 1.3e-4."""
    model = randomize_(WanDiT(CFG), seed=0, std=0.02).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name.startswith("blocks"):
                idx = torch.randint(0, m.weight.numel(), (4,), generator=g)
                m.weight.view(-1)[idx] = 600.0 * torch.randn(4, generator=g).sign()
    x, t, ctx = dit_inputs()
    errs = {}
    with torch.no_grad():
        ref = model(x, t, ctx)
        for mode in ("fp8", "fp8_scaled"):
            quant = copy.deepcopy(model)
            quantize_(quant, mode, keep=WanDiT.keep_in_fp32)
            errs[mode] = rel_err(quant(x, t, ctx), ref)
    assert errs["fp8_scaled"] * 4 < errs["fp8"], errs


def test_mode_none_changes_nothing(dit_file):
    model = load_dit(dit_file, torch.float32)
    report = quantize_(model, "none", keep=WanDiT.keep_in_fp32)
    assert report.quantized == 0 and report.ratio == 1.0 and report.bytes_after == report.bytes_before
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Text encoder


# The tiny umT5 (width 32, ffn 64) averages fewer weight errors per dot product than the DiT (each
# layer alone: fp8 2-5%, int8 0.4-0.7%) and its unscaled attention and gated FFN amplify them
# through two blocks. Measured on the output: fp8 0.050, fp8_scaled 0.048, int8 0.014.
TE_TOL = {"fp8": 8e-2, "fp8_scaled": 8e-2, "int8": 2.5e-2}


@pytest.mark.parametrize("mode", ["fp8", "fp8_scaled", "int8"])
def test_text_encoder_quantised_stays_close(tmp_path, mode):
    path = tmp_path / "t5.safetensors"
    save_file(tiny_t5_state_dict(seed=0), str(path))
    te = wan.load_text_encoder(path)
    quant = copy.deepcopy(te)
    # dim 32 is narrower than a 64-wide block: 16-wide blocks so the block path is what runs
    report = quantize_(quant, mode, keep=keep_from_traits(quant), block_size=16)
    assert report.quantized == TINY_T5["layers"] * 7  # q k v o, gate, fc1, fc2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, TINY_T5["vocab"], (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        err = rel_err(quant(ids, mask), te(ids, mask))
    assert 0 < err <= TE_TOL[mode], err


# ---------------------------------------------------------------------------------------------
# The layer itself


def test_bad_mode_and_arguments_are_named():
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"'fp4'.*none, fp8, fp8_scaled, int8"):
        quantize_(model, "fp4")
    with pytest.raises(ValueError, match="block_size.*0"):
        quantize_(model, "fp8_scaled", block_size=0)
    with pytest.raises(ValueError, match="compute_dtype"):
        quantize_(model, "fp8", compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="from_linear"):
        quantize_(nn.Linear(4, 4), "fp8")
    assert QUANT_MODES == ("none", "fp8", "fp8_scaled", "int8")


def test_weight_property_and_compute_dtype():
    """The DiT reads ``layer.weight.dtype``: it must see the compute dtype, never fp8 or int8."""
    lin = randomize_(nn.Linear(64, 32), seed=2)
    q = QuantLinear.from_linear(lin, "int8", compute_dtype=torch.bfloat16)
    assert q.qweight.dtype == torch.int8 and q.weight.dtype == torch.bfloat16
    assert compute_dtype_of(q) == torch.bfloat16 and compute_dtype_of(lin) == torch.float32
    x = torch.randn(3, 64)
    y = q(x)  # float32 in, bf16 compute
    assert y.dtype == torch.bfloat16 and rel_err(y, lin(x)) < 2e-2
    assert torch.equal(q.weight, q.dequantized_weight(torch.bfloat16))


def test_module_to_keeps_storage_and_moves_compute_dtype():
    model = nn.Sequential(randomize_(nn.Linear(64, 64), seed=1))
    quantize_(model, "fp8_scaled")
    scale = model[0].weight_scale.clone()
    model.to(torch.bfloat16)
    assert model[0].qweight.dtype == FP8 and model[0].compute_dtype == torch.bfloat16
    assert torch.equal(model[0].weight_scale, scale)  # float32 scales not rounded to bf16
    model.float()
    assert model[0].compute_dtype == torch.float32 and model[0].qweight.dtype == FP8


def test_quantise_on_meta_sizes_a_plan():
    """A planner can size a quantised model without reading any weights."""
    with torch.device("meta"):
        meta = WanDiT(CFG)
    real = WanDiT(CFG)
    r_meta = quantize_(meta, "fp8_scaled", keep=WanDiT.keep_in_fp32)
    r_real = quantize_(real, "fp8_scaled", keep=WanDiT.keep_in_fp32)
    assert r_meta.bytes_after == r_real.bytes_after and r_meta.ratio == r_real.ratio
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Pre-quantised files


def test_load_quantized_linear_from_comfyui_file(tmp_path):
    """A ComfyUI scaled-fp8 layer (fp8 weight, one float32 scale_weight, bias) builds a layer whose
    weight equals, bit for bit, what the loader's dequantising reader gives."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * 0.05
    scale = w.abs().max() / 448
    prefix = "model.diffusion_model.blocks.0.ffn.0."
    state = {prefix + "weight": (w / scale).to(FP8), prefix + "scale_weight": scale.reshape(1).float(),
             prefix + "bias": torch.randn(48, generator=g).to(torch.bfloat16),
             "model.diffusion_model.head.modulation": torch.zeros(1, 2, 64)}
    save_file(state, str(tmp_path / "comfy_fp8.safetensors"))
    save_file({"blocks.0.ffn.0.weight": w}, str(tmp_path / "float.safetensors"))

    ckpt = open_checkpoint(tmp_path / "comfy_fp8.safetensors")
    assert is_prequantized(ckpt) and prequantized_mode(ckpt) == "fp8_scaled"
    assert is_prequantized(tmp_path / "comfy_fp8.safetensors")
    assert prequantized_mode({"a.weight": state[prefix + "weight"]}) == "fp8"
    assert not is_prequantized(tmp_path / "float.safetensors")

    layer = load_quantized_linear_from(ckpt.tensor(prefix + "weight"), ckpt.tensor(prefix + "scale_weight"),
                                       ckpt.tensor(prefix + "bias"), compute_dtype=torch.float32)
    expected = weight_reader(ckpt, prefix + "weight")()
    assert layer.qweight.dtype == FP8 and layer.scale_kind == "tensor"
    assert torch.equal(layer.dequantized_weight(torch.float32), expected)
    x = torch.randn(5, 64, generator=g)
    assert torch.equal(layer(x), F.linear(x, expected, ckpt.tensor(prefix + "bias").float()))


def test_load_quantized_linear_from_musubi_blocks():
    """musubi's block scales [out, blocks, 1] are read in place: no requantising, same values."""
    w = randomize_(nn.Linear(128, 32), seed=3).weight.detach()
    q, scale = quantize_fp8_blockwise(w, 64)
    assert scale.shape == (32, 2, 1)
    scale = scale.to(torch.bfloat16)  # musubi keeps scales in the model dtype
    layer = load_quantized_linear_from(q, scale, compute_dtype=torch.float32)
    assert layer.qweight is q
    assert torch.equal(layer.dequantized_weight(), (q.float().view(32, 2, 64) * scale.float()).view(32, 128))
    with pytest.raises(ValueError, match=r"float8.*torch.float32"):
        load_quantized_linear_from(w)
    with pytest.raises(ValueError, match=r"scale_weight of shape \(5,\)"):
        load_quantized_linear_from(q, torch.ones(5))


# ---------------------------------------------------------------------------------------------
# torch._scaled_mm


def test_select_matmul():
    base = {"enabled": True, "device_type": "cuda", "capability": (9, 0), "weight_dtype": FP8,
            "scale_kind": "row", "in_features": 128, "out_features": 256, "compute_dtype": torch.bfloat16}
    assert select_matmul(**base) == "scaled_mm_rowwise"
    assert select_matmul(**{**base, "scale_kind": "tensor"}) == "scaled_mm_tensorwise"
    assert select_matmul(**{**base, "scale_kind": "none", "capability": (8, 9)}) == "scaled_mm_tensorwise"
    for change in ({"enabled": False}, {"device_type": "cpu"}, {"capability": (8, 6)},
                   {"scale_kind": "block"}, {"in_features": 120}, {"out_features": 100},
                   {"weight_dtype": torch.int8}, {"capability": (8, 9)},  # rowwise needs sm90
                   {"compute_dtype": torch.float16}):                     # rowwise gives bf16 only
        assert select_matmul(**{**base, **change}) == "dequant", change
    # scaled_mm=True asks fp8_scaled for row scales, which the kernel accepts; CPU still dequantises
    q = QuantLinear.from_linear(nn.Linear(64, 32), "fp8_scaled", scaled_mm=True)
    assert q.scale_kind == "row" and q.matmul_path(torch.zeros(1, 64)) == "dequant"


@pytest.mark.parametrize("rowwise", [False, True])
def test_scaled_mm_linear_numerics(rowwise):
    """torch._scaled_mm runs on CPU in torch 2.13. Activations built from fp8 values times powers of
    two quantise exactly, so the only difference left from the dequantised matmul is float32
    accumulation order: 1e-5. A swapped or misplaced scale would be off by factors of 2 or more."""
    g = torch.Generator().manual_seed(0)
    lin = randomize_(nn.Linear(64, 48), seed=4)
    if rowwise:  # one scale per output row
        q = QuantLinear.from_linear(lin, "fp8_scaled", block_size=None, compute_dtype=torch.float32)
    else:  # one scale for the tensor, as ComfyUI files have
        q = load_quantized_linear_from(quantize_fp8(lin.weight.detach() / 0.01), torch.tensor(0.01),
                                       lin.bias.detach(), compute_dtype=torch.float32)
    a = torch.randn(6, 64, generator=g).clamp(-3, 3) * 100
    a[:, 0] = 448.0  # row amax exactly 448 -> activation scales are powers of two
    a = a.to(FP8).float() * (2.0 ** torch.arange(-3, 3.0))[:, None] if rowwise else a.to(FP8).float() / 8
    y = scaled_mm_linear(a, q.qweight, q.weight_scale, q.bias, torch.float32, rowwise=rowwise)
    ref = F.linear(a, q.dequantized_weight(torch.float32), q.bias)
    assert rel_err(y, ref) <= 1e-5
    # ordinary inputs: fp8 activations cost about as much as fp8 weights did
    x = torch.randn(2, 6, 64, generator=g)
    assert rel_err(scaled_mm_linear(x, q.qweight, q.weight_scale, q.bias, torch.float32, rowwise), q(x)) < 5e-2
