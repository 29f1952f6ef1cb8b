"""Loading the DiT from every public layout, and the errors for broken or foreign files.

Each format is written by the test with the real key names and dtypes, at tiny size (width 256 =
two heads of 128, so the head count is inferred as for real checkpoints).
"""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import wan
from helpers import randomize_, rel_err
from wan.loading.files import CheckpointError
from wan.loading.keymaps import DIT_DIFFUSERS
from wan.models.dit import DiTConfig, WanDiT

CFG = DiTConfig(dim=256, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=16)


@pytest.fixture(scope="module")
def official_state():
    model = randomize_(WanDiT(CFG), seed=11, std=0.1)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def probe():
    g = torch.Generator().manual_seed(5)
    return torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([250.0]), torch.randn(1, 6, 16, generator=g)


def run(model, probe):
    x, t, ctx = probe
    with torch.no_grad():
        return model(x, t, ctx)


def reference_output(state, probe):
    model = WanDiT(CFG)
    model.load_state_dict(state)
    return run(model.eval(), probe)


def assert_loaded(model, state, probe):
    """Every weight equals the expected one, and the outputs agree. (Outputs are compared within
    1e-6, not bit for bit: CPU kernels may round differently with differently aligned memory.)"""
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(state)
    for k, v in state.items():
        assert torch.equal(loaded[k].float(), v.float()), k
    assert rel_err(run(model, probe), reference_output(state, probe)) <= 1e-6


def test_official_single_file(tmp_path, official_state, probe):
    save_file(official_state, tmp_path / "diffusion_pytorch_model.safetensors")
    model = wan.load_transformer(tmp_path / "diffusion_pytorch_model.safetensors")
    assert model.config == CFG
    assert_loaded(model, official_state, probe)


def _write_shards(folder, state, n=3):
    keys = sorted(state)
    weight_map = {}
    for i in range(n):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: state[k] for k in keys[i::n]}
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def test_official_sharded_folder_with_config(tmp_path, official_state, probe):
    _write_shards(tmp_path, official_state)
    (tmp_path / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": "t2v", "dim": 256, "ffn_dim": 64, "freq_dim": 32, "in_dim": 16,
        "out_dim": 16, "num_heads": 2, "num_layers": 2, "text_len": 512, "eps": 1e-6}))
    model = wan.load_transformer(tmp_path)
    assert_loaded(model, official_state, probe)
    # the same shards given as a list of files
    shards = sorted(tmp_path.glob("*-of-*.safetensors"))
    model = wan.load_transformer([str(p) for p in shards])
    assert_loaded(model, official_state, probe)


def test_config_json_contradicting_shapes_is_an_error(tmp_path, official_state):
    save_file(official_state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"dim": 5120, "num_layers": 2}))
    with pytest.raises(CheckpointError, match="dim=5120.*dim=256"):
        wan.load_transformer(tmp_path)


def test_comfyui_prefixed_bf16(tmp_path, official_state, probe):
    state = {f"model.diffusion_model.{k}": v.to(torch.bfloat16) for k, v in official_state.items()}
    save_file(state, tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors")
    model = wan.load_transformer(tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors")
    # weights of the blocks keep the file's dtype; float32 islands stay float32
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32
    assert model.head.head.weight.dtype == torch.float32
    as_float = wan.load_transformer(tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors", dtype=torch.float32)
    expected = {k[len("model.diffusion_model."):]: v.float() for k, v in state.items()}
    assert_loaded(as_float, expected, probe)


def _is_quantised(key, t):
    return t.ndim == 2 and key.endswith(".weight") and "norm" not in key


def test_fp8_plain(tmp_path, official_state, probe):
    state = {k: (v.to(torch.float8_e4m3fn) if _is_quantised(k, v) else v) for k, v in official_state.items()}
    save_file(state, tmp_path / "wan_fp8_e4m3fn.safetensors")
    model = wan.load_transformer(tmp_path / "wan_fp8_e4m3fn.safetensors", dtype=torch.float32)
    dequantised = {k: v.float() for k, v in state.items()}
    assert_loaded(model, dequantised, probe)


def test_fp8_scaled_comfyui(tmp_path, official_state, probe):
    state, dequantised = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in official_state.items():
        if _is_quantised(k, v):
            scale = v.abs().max() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            state[f"model.diffusion_model.{k}"] = q
            state[f"model.diffusion_model.{k[:-len('.weight')]}.scale_weight"] = scale.reshape(1)
            dequantised[k] = q.float() * scale
        else:
            state[f"model.diffusion_model.{k}"] = v
            dequantised[k] = v
    save_file(state, tmp_path / "wan_fp8_scaled.safetensors")
    model = wan.load_transformer(tmp_path / "wan_fp8_scaled.safetensors", dtype=torch.float32)
    out = run(model, probe)
    assert rel_err(out, reference_output(dequantised, probe)) <= 1e-6
    # and the scaled weights are close to the originals (fp8 keeps ~2 significant digits)
    assert rel_err(out, reference_output(official_state, probe)) < 0.1
    # without a dtype, an fp8 file loads as bfloat16
    assert wan.load_transformer(tmp_path / "wan_fp8_scaled.safetensors").blocks[0].self_attn.q.weight.dtype == torch.bfloat16


def test_diffusers_folder_and_single_file(tmp_path, official_state, probe):
    from diffusers import WanTransformer3DModel
    ref = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=128, text_dim=16, freq_dim=32, ffn_dim=64,
                                num_layers=2)
    converted = {DIT_DIFFUSERS.from_official(k): v for k, v in official_state.items()}
    ref.load_state_dict(converted, strict=False)
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    # a pipeline folder (transformer/ subfolder) and the transformer folder itself
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):
        assert_loaded(wan.load_transformer(path, dtype=torch.float32), official_state, probe)
    save_file(converted, tmp_path / "wan_diffusers.safetensors")
    assert_loaded(wan.load_transformer(tmp_path / "wan_diffusers.safetensors"), official_state, probe)


def test_pth_file(tmp_path, official_state, probe):
    torch.save(official_state, tmp_path / "wan.pth")
    model = wan.load_transformer(tmp_path / "wan.pth")
    assert_loaded(model, official_state, probe)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"patch_embedding.weight": _Exploit(marker)}, fh)
    torch.save({"w": torch.zeros(1), "x": _Exploit(marker)}, tmp_path / "evil_zip.pth")
    for name in ("evil.pth", "evil_zip.pth"):
        with pytest.raises(CheckpointError, match=f"{name}.*refused"):
            wan.load_transformer(tmp_path / name)
    assert not marker.exists()


def test_truncated_file(tmp_path, official_state):
    path = tmp_path / "cut.safetensors"
    save_file(official_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated"):
        wan.load_transformer(path)
    pth = tmp_path / "cut.pth"
    torch.save(official_state, pth)
    pth.write_bytes(pth.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated"):
        wan.load_transformer(pth)


def test_missing_shard(tmp_path, official_state):
    _write_shards(tmp_path, official_state)
    (tmp_path / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: diffusion_pytorch_model-00002-of-00003.safetensors"):
        wan.load_transformer(tmp_path)


def test_file_of_another_family(tmp_path):
    vae_like = {"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3), "decoder.conv1.weight": torch.zeros(4, 4, 3, 3, 3)}
    save_file(vae_like, tmp_path / "Wan2.1_VAE.safetensors")
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.safetensors.*not a Wan DiT.*VAE"):
        wan.load_transformer(tmp_path / "Wan2.1_VAE.safetensors")


def test_missing_tensor_is_named(tmp_path, official_state):
    state = dict(official_state)
    del state["blocks.1.cross_attn.k.weight"]
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="missing 1 tensors.*blocks.1.cross_attn.k.weight"):
        wan.load_transformer(tmp_path / "partial.safetensors")


def test_a14b_root_folder_asks_for_one_expert(tmp_path, official_state):
    for expert in ("high_noise_model", "low_noise_model"):
        (tmp_path / expert).mkdir()
        save_file(official_state, tmp_path / expert / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="two experts"):
        wan.load_transformer(tmp_path)
    assert wan.load_transformer(tmp_path / "high_noise_model").config == CFG


def test_fp8_file_kept_quantised(tmp_path, official_state, probe):
    """keep_fp8: the file's fp8 weights stay fp8 in memory (about half of bf16), and the model
    computes what the dequantised model computes."""
    from wan.layers.quant import QuantLinear
    from wan.optim.quant import module_bytes
    state, dequantised = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in official_state.items():
        if _is_quantised(k, v):
            scale = v.abs().max() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            state[f"model.diffusion_model.{k}"], dequantised[k] = q, q.float() * scale
            state[f"model.diffusion_model.{k[:-len('.weight')]}.scale_weight"] = scale.reshape(1)
        else:
            state[f"model.diffusion_model.{k}"] = dequantised[k] = v
    save_file(state, tmp_path / "wan_fp8_scaled.safetensors")
    kept = wan.load_transformer(tmp_path / "wan_fp8_scaled.safetensors", dtype=torch.float32, keep_fp8=True)
    assert isinstance(kept.blocks[0].self_attn.q, QuantLinear)
    assert kept.blocks[0].self_attn.q.qweight.dtype == torch.float8_e4m3fn
    assert not isinstance(kept.head.head, QuantLinear)  # float32 islands stay plain
    assert rel_err(run(kept, probe), reference_output(dequantised, probe)) <= 1e-6
    # memory: in bf16, every quantised weight takes 1 byte instead of 2, plus a 4-byte scale per layer
    kept16 = wan.load_transformer(tmp_path / "wan_fp8_scaled.safetensors", dtype=torch.bfloat16, keep_fp8=True)
    whole = wan.load_transformer(tmp_path / "wan_fp8_scaled.safetensors", dtype=torch.bfloat16)
    layers = [m for m in kept16.modules() if isinstance(m, QuantLinear)]
    saved = sum(m.qweight.numel() for m in layers) - 4 * len(layers)
    assert module_bytes(whole) - module_bytes(kept16) == saved > 0
