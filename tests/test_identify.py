"""Identification of checkpoint files by their tensors (wan.loading.identify).

Tiny files in every public layout and precision are written under ComfyUI, Wan2GP and Hugging Face
cache folder trees with misleading names; each must be identified by its tensors alone. Files of
other families, broken files and a malicious pickle are reported, and nothing is executed.
"""

import json
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from wan.loading.identify import (Identity, Match, classify_dit, identify, registry_matches, registry_notice,
                                  size_label)
from wan.loading.model_folders import folder_hints, scan_folder
from wan.loading.keymaps import DIT_DIFFUSERS
from wan.loading.vae import official_to_diffusers
from wan.models.dit import DiTConfig, WanDiT
from wan.registry import load_registry
from wan.testing.tiny_encoders import tiny_clip_state_dict, tiny_t5_state_dict
from wan.testing.tiny_family import tiny_dit_state_dict
from wan.testing.tiny_vae import tiny_vae_state_dict

FP8 = torch.float8_e4m3fn
COMFY = "model.diffusion_model."


# ---------------------------------------------------------------------------------------------
# Writers of the public layouts


def _cast(sd, dtype):
    return {k: v.to(dtype) for k, v in sd.items()}


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def _quantisable(key, t):
    return t.ndim == 2 and key.endswith(".weight") and "norm" not in key


def _fp8_plain(sd):
    return {k: (v.to(FP8) if _quantisable(k, v) else v.to(torch.bfloat16)) for k, v in sd.items()}


def _fp8_scaled(sd, scale_shape=(1,)):
    """ComfyUI's scaled fp8: e4m3 matrices, a float32 scale_weight each, a scaled_fp8 marker."""
    out = {"scaled_fp8": torch.zeros(0, dtype=FP8)}
    for k, v in sd.items():
        if _quantisable(k, v):
            scale = v.abs().max() / 448.0
            out[k] = (v / scale).to(FP8)
            out[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(scale_shape).float()
        else:
            out[k] = v.to(torch.bfloat16)
    return out


_T5_TO_HF = [  # official Wan umT5 names -> transformers names (as ComfyUI's umt5_xxl files)
    (r"^token_embedding\.", "shared."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^blocks\.(\d+)\.attn\.([qkvo])\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
    (r"^blocks\.(\d+)\.pos_embedding\.embedding\.", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
    (r"^blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
    (r"^blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
    (r"^norm\.", "encoder.final_layer_norm."),
]


def _t5_transformers(sd):
    out = {}
    for k, v in sd.items():
        for pat, rep in _T5_TO_HF:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            raise AssertionError(k)
    return out


def _save(path, sd):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def _few(keys, shape=(4, 4)):
    return {k: torch.zeros(shape, dtype=torch.float16) for k in keys}


def _custom_dit():
    cfg = DiTConfig(dim=384, ffn_dim=768, num_heads=3, num_layers=1, freq_dim=256, text_dim=32)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    return {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in shapes.items()}


# relative path -> (state dict builder, expected identity fields)
def _tree():
    dit = tiny_dit_state_dict
    t5, clip = tiny_t5_state_dict(seed=1), tiny_clip_state_dict(seed=2)
    vae21, vae22 = tiny_vae_state_dict("2.1", seed=3), tiny_vae_state_dict("2.2", seed=4)
    to_diffusers = official_to_diffusers(vae22)
    vae22_diffusers = {to_diffusers[k]: v for k, v in vae22.items()}
    fun_control = dit("fun_control", 5)
    hf = "hf/hub/models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers/snapshots/0123abcd/transformer"
    return {
        # ComfyUI tree: names say one thing, tensors another
        "comfy/models/vae/wan_2.1_vae.safetensors": (
            dit("t2v", 1), dict(kind="dit", variant="t2v", precision="fp32", layout="official", size_label="custom")),
        "comfy/models/diffusion_models/umt5_xxl_fp16.safetensors": (
            _prefixed(_cast(dit("i2v", 2), torch.bfloat16), COMFY),
            dict(kind="dit", variant="i2v", alternatives=("fun_inp",), precision="bf16", layout="comfyui",
                 prefix=COMFY)),
        "comfy/models/unet/flux1-dev.safetensors": (  # ComfyUI repackaged files without prefix
            _cast(dit("flf2v", 3), torch.float16), dict(kind="dit", variant="flf2v", precision="fp16", layout="official")),
        "comfy/models/diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors": (
            _prefixed(_fp8_plain(dit("vace", 4)), COMFY),
            dict(kind="dit", variant="vace", precision="fp8_e4m3fn", layout="comfyui")),
        "comfy/models/diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors": (
            _fp8_scaled(dit("ti2v", 6)), dict(kind="dit", variant="ti2v", precision="fp8_scaled", layout="comfyui")),
        "comfy/models/loras/wan21_causvid_lora.safetensors": (
            {DIT_DIFFUSERS.from_official(k): v.to(torch.bfloat16) for k, v in fun_control.items()},
            dict(kind="dit", variant="fun_control", precision="bf16", layout="diffusers")),
        "comfy/models/text_encoders/clip_vision_h.safetensors": (
            _cast(vae22_diffusers, torch.bfloat16), dict(kind="vae", version="2.2", layout="diffusers", precision="bf16")),
        "comfy/models/clip/wan_2.1_vae.safetensors": (
            _fp8_scaled(_t5_transformers(t5), scale_shape=()),
            dict(kind="text_encoder", layout="transformers", precision="fp8_scaled")),
        "comfy/models/clip_vision/umt5_xxl_fp8_e4m3fn_scaled.safetensors": (
            _cast(vae21, torch.float16), dict(kind="vae", version="2.1", layout="official", precision="fp16")),
        "comfy/models/vae/clip_vision_h.safetensors": (
            _cast(clip, torch.float16), dict(kind="clip", layout="official", precision="fp16")),
        "comfy/models/diffusion_models/wan2.1_i2v_480p_14B_fp16.safetensors": (
            _cast(dit("fun_inp", 7), torch.float16), dict(kind="dit", variant="i2v", alternatives=("fun_inp",))),
        # LoRAs, in two namings, and one of another family
        "comfy/models/diffusion_models/wan2.1_t2v_14B_fp8.safetensors": (
            {f"diffusion_model.blocks.{i}.self_attn.q.lora_{ab}.weight": torch.zeros((8, 256) if ab == "A" else (256, 8))
             for i in range(2) for ab in "AB"}, dict(kind="lora", family="wan", rank=8)),
        "comfy/models/loras/musubi.safetensors": (
            {"lora_unet_blocks_0_cross_attn_k.lora_down.weight": torch.zeros(4, 256),
             "lora_unet_blocks_0_cross_attn_k.lora_up.weight": torch.zeros(256, 4),
             "lora_unet_blocks_0_cross_attn_k.alpha": torch.tensor(4.0)}, dict(kind="lora", family="wan", rank=4)),
        "comfy/models/loras/wan_style.safetensors": (
            {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(16, 64),
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 16)},
            dict(kind="lora", family=None, rank=16)),
        # other families
        "comfy/models/diffusion_models/hunyuan_video_720_cfgdistill_bf16.safetensors": (
            _few(["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight",
                  "guidance_in.in_layer.weight"]), dict(kind="other", family="flux")),
        "comfy/models/diffusion_models/flux1-schnell.safetensors": (
            _few(["double_blocks.0.img_attn_qkv.weight", "txt_in.individual_token_refiner.blocks.0.norm1.weight",
                  "img_in.proj.weight"]), dict(kind="other", family="hunyuan")),
        "comfy/models/checkpoints/wan2.1_t2v_1.3B.safetensors": (
            _few([COMFY + "input_blocks.0.0.weight", COMFY + "out.2.weight",
                  "first_stage_model.decoder.conv_in.weight", "first_stage_model.encoder.down.0.block.0.norm1.weight"]),
            dict(kind="other", family="sd")),
        "comfy/models/text_encoders/t5xxl_fp16.safetensors": (
            _few(["encoder.block.0.layer.0.SelfAttention.q.weight",
                  "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                  "encoder.block.1.layer.0.SelfAttention.q.weight", "shared.weight"]), dict(kind="other", family="t5")),
        # Wan2GP ckpts/: official files and a .pth
        "Wan2GP/ckpts/models_t5_umt5-xxl-enc-bf16.pth": (
            _cast(dit("i2v_a14b", 8), torch.bfloat16),
            dict(kind="dit", variant="i2v", expert="pair_member", precision="bf16", layout="official")),
        "Wan2GP/ckpts/Wan2.1_VAE.pth": (
            _cast(t5, torch.bfloat16), dict(kind="text_encoder", layout="official", precision="bf16")),
        "Wan2GP/ckpts/wan2.2_ti2v_5B_mbf16.pth": (vae22, dict(kind="vae", version="2.2", precision="fp32")),
        "Wan2GP/ckpts/wan2.1_text2video_1.3B_bf16.safetensors": (
            _custom_dit(), dict(kind="dit", variant="t2v", size_label="custom", dim=384, num_layers=1)),
        # a Hugging Face cache: diffusers shards with their index (identified once, as a whole)
        f"{hf}/diffusion_pytorch_model.safetensors.index.json": (
            {DIT_DIFFUSERS.from_official(k): v for k, v in dit("t2v", 9).items()},
            dict(kind="dit", variant="t2v", layout="diffusers")),
    }


def _write_index(path, sd):
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for n, part in enumerate((keys[:half], keys[half:])):
        name = f"diffusion_pytorch_model-0000{n + 1}-of-00002.safetensors"
        _save(path.parent / name, {k: sd[k] for k in part})
        weight_map.update({k: name for k in part})
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    expected = {}
    for rel, (sd, want) in _tree().items():
        path = root / rel
        if rel.endswith(".index.json"):
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_index(path, sd)
        else:
            _save(path, sd)
        expected[rel] = want
    bad = root / "comfy/models/diffusion_models"
    full = bad / "wan2.1_vace_14B_fp16.safetensors"
    _save(full, _cast(tiny_dit_state_dict("t2v", 10), torch.float16))
    (bad / "wan2.1_t2v_14B_truncated.safetensors").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    (bad / "readme.safetensors").write_text("These are the model weights, see the website.\n")
    (bad / "empty.pth").write_bytes(b"")
    full.unlink()
    expected.update({
        "comfy/models/diffusion_models/wan2.1_t2v_14B_truncated.safetensors": dict(kind="unreadable"),
        "comfy/models/diffusion_models/readme.safetensors": dict(kind="unreadable"),
        "comfy/models/diffusion_models/empty.pth": dict(kind="unreadable"),
    })
    return root, expected


def test_every_file_is_identified_by_its_tensors(tree):
    root, expected = tree
    found = {str(f.path.relative_to(root)): f for f in scan_folder(root)}
    assert sorted(found) == sorted(expected)  # shards are covered by their index
    for rel, want in expected.items():
        identity = found[rel].identity
        got = {k: getattr(identity, k) for k in want}
        assert got == want, f"{rel}: {identity.summary()}"
        if identity.kind == "unreadable":
            assert identity.reason
    hf = next(f for rel, f in found.items() if rel.endswith(".index.json"))
    assert hf.repo == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" and len(hf.identity.files) == 2
    # folder hints are hints: a DiT in vae/ is flagged, not believed
    misplaced = found["comfy/models/vae/wan_2.1_vae.safetensors"]
    assert misplaced.hint == "vae" and misplaced.misplaced
    assert found["comfy/models/vae/clip_vision_h.safetensors"].misplaced  # a CLIP tower in vae/
    assert not found["comfy/models/unet/flux1-dev.safetensors"].misplaced  # a Wan DiT in unet/
    assert not found["comfy/models/text_encoders/t5xxl_fp16.safetensors"].misplaced  # not a Wan file
    assert found["Wan2GP/ckpts/Wan2.1_VAE.pth"].hint == "wan2gp"


def test_broken_files_give_reasons(tree):
    root, _ = tree
    d = root / "comfy/models/diffusion_models"
    assert "truncated" in identify(d / "wan2.1_t2v_14B_truncated.safetensors").reason
    assert "not a safetensors file" in identify(d / "readme.safetensors").reason
    assert identify(d / "empty.pth").kind == "unreadable"
    assert identify(root / "nothing.safetensors").kind == "unreadable"  # missing file: no exception


def test_dit_details(tree):
    root, _ = tree
    vace = identify(root / "comfy/models/diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors")
    assert vace.dit == DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32, vace_layers=(0, 1))
    assert vace.num_params == sum(v.numel() for v in tiny_dit_state_dict("vace", 0).values())
    custom = identify(root / "Wan2GP/ckpts/wan2.1_text2video_1.3B_bf16.safetensors")
    assert any("size no public model has" in n for n in custom.notes)
    expert = identify(root / "Wan2GP/ckpts/models_t5_umt5-xxl-enc-bf16.pth")
    assert expert.dit.image_dim is None and "high-noise or the low-noise" in " ".join(expert.notes)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpts"
    folder.mkdir()
    with open(folder / "Wan2.1_VAE.pth", "wb") as fh:
        pickle.dump({"patch_embedding.weight": _Exploit(marker)}, fh)
    torch.save({"w": torch.zeros(1), "x": _Exploit(marker)}, folder / "evil_zip.pth")
    found = scan_folder(tmp_path)
    assert len(found) == 2
    for f in found:
        assert f.identity.kind == "unreadable" and "refused" in f.identity.reason, f.identity
    assert not marker.exists()


def test_scan_survives_link_loops_and_dedupes_links(tmp_path):
    blob = tmp_path / "hub/models--a--b/blobs/1f2e3d"
    _save(blob.with_suffix(".safetensors"), tiny_vae_state_dict("2.1", seed=0))
    blob.with_suffix(".safetensors").rename(blob)  # blobs have no suffix: never listed themselves
    snap = tmp_path / "hub/models--a--b/snapshots/abc"
    snap.mkdir(parents=True)
    (snap / "vae.safetensors").symlink_to(blob)
    (snap / "again.safetensors").symlink_to(blob)
    (snap / "loop").symlink_to(tmp_path, target_is_directory=True)
    found = scan_folder([tmp_path, tmp_path / "hub"])
    assert len(found) == 1
    assert found[0].identity.kind == "vae" and found[0].repo == "a/b"


def test_cache_makes_a_second_scan_cheap_and_notices_changes(tree, tmp_path):
    root, _ = tree
    cache = tmp_path / "identify_cache.json"
    first = scan_folder(root, cache=cache)
    assert cache.exists() and not any(f.cached for f in first)
    second = scan_folder(root, cache=cache)
    assert all(f.cached for f in second)
    assert [f.identity for f in second] == [f.identity for f in first]
    # a changed file is identified again; the others stay cached
    target = root / "Wan2GP/ckpts/wan2.2_ti2v_5B_mbf16.pth"
    saved = target.read_bytes()
    try:
        _save(target, tiny_vae_state_dict("2.1", seed=5))
        third = {f.path: f for f in scan_folder(root, cache=cache)}
        assert not third[target].cached and third[target].identity.version == "2.1"
        assert sum(not f.cached for f in third.values()) == 1
    finally:
        target.write_bytes(saved)
    cache.write_text("{not json")  # a damaged cache is rebuilt, not an error
    assert len(scan_folder(root, cache=cache)) == len(first)


def test_identity_round_trips_through_json(tree):
    root, _ = tree
    for f in scan_folder(root):
        assert Identity.from_dict(json.loads(json.dumps(f.identity.to_dict()))) == f.identity


# ---------------------------------------------------------------------------------------------
# Sizes and registry matches on shape dicts (full-size shapes, no file)


def _shapes(dim, layers, ffn, in_dim=16, out_dim=16, clip=False, flf=False, vace=0, ref_conv=False):
    """The official-named shapes the identification reads, for a DiT of any size."""
    s = {"patch_embedding.weight": (dim, in_dim, 1, 2, 2), "head.head.weight": (out_dim * 4, dim),
         "time_embedding.0.weight": (dim, 256), "text_embedding.0.weight": (dim, 4096)}
    for i in range(layers):
        s[f"blocks.{i}.ffn.0.weight"] = (ffn, dim)
    if clip:
        s["img_emb.proj.0.weight"] = (1280,)
    if flf:
        s["img_emb.emb_pos"] = (1, 514, 1280)
    for i in range(vace):
        s[f"vace_blocks.{i}.before_proj.weight"] = (dim, dim)
    if vace:
        s["vace_patch_embedding.weight"] = (dim, 96, 1, 2, 2)
    if ref_conv:
        s["ref_conv.weight"] = (dim, 16, 2, 2)
    return s


def test_size_label():
    assert size_label(1536, 30, 8960) == "1.3B"
    assert size_label(5120, 40, 13824) == "14B"
    assert size_label(3072, 30, 14336) == "5B"
    assert size_label(384, 1, 768) == "custom"
    assert size_label(5120, 30, 13824) == "custom"


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.mark.parametrize("shapes, variant, size, expert, want", [
    (_shapes(1536, 30, 8960), "t2v", "1.3B", None, {("wan2.1-t2v-1.3B", "transformer")}),
    (_shapes(5120, 40, 13824), "t2v", "14B", "possible",
     {("wan2.1-t2v-14B", "transformer"), ("wan2.1-t2i-14B", "transformer"),
      ("wan2.2-t2v-A14B", "transformer_high_noise"), ("wan2.2-t2v-A14B", "transformer_low_noise")}),
    (_shapes(5120, 40, 13824, in_dim=36, clip=True), "i2v", "14B", None,
     {("wan2.1-i2v-14B-480P", "transformer"), ("wan2.1-i2v-14B-720P", "transformer"),
      ("wan2.1-fun-inp-14B", "transformer")}),
    (_shapes(1536, 30, 8960, in_dim=36, clip=True), "fun_inp", "1.3B", None, {("wan2.1-fun-inp-1.3B", "transformer")}),
    (_shapes(5120, 40, 13824, in_dim=36), "i2v", "14B", "pair_member",
     {("wan2.2-i2v-A14B", "transformer_high_noise"), ("wan2.2-i2v-A14B", "transformer_low_noise")}),
    (_shapes(5120, 40, 13824, in_dim=36, clip=True, flf=True), "flf2v", "14B", None,
     {("wan2.1-flf2v-14B-720P", "transformer")}),
    (_shapes(3072, 30, 14336, in_dim=48, out_dim=48), "ti2v", "5B", None, {("wan2.2-ti2v-5B", "transformer")}),
    (_shapes(1536, 30, 8960, vace=15), "vace", "1.3B", None, {("wan2.1-vace-1.3B", "transformer")}),
    (_shapes(5120, 40, 13824, vace=8), "vace", "14B", None, {("wan2.1-vace-14B", "transformer")}),
    (_shapes(1536, 30, 8960, in_dim=48, clip=True, ref_conv=True), "fun_control", "1.3B", None,
     {("wan2.1-fun-v1.1-control-1.3B", "transformer")}),
    (_shapes(2048, 32, 8192), "t2v", "custom", None, set()),
])
def test_full_size_shapes(registry, shapes, variant, size, expert, want):
    identity = classify_dit(shapes)
    assert (identity.variant, identity.size_label, identity.expert) == (variant, size, expert)
    got = {(m.model_id, m.role) for m in registry_matches(identity, registry)}
    assert got == want
    assert all(isinstance(m, Match) for m in registry_matches(identity, registry))


def test_registry_matches_tiny_family(tree, registry):
    root, _ = tree
    fun = identify(root / "comfy/models/diffusion_models/wan2.1_i2v_480p_14B_fp16.safetensors")
    assert {m.model_id for m in registry_matches(fun, registry)} == {"test-tiny-i2v", "test-tiny-fun-inp"}
    expert = identify(root / "Wan2GP/ckpts/models_t5_umt5-xxl-enc-bf16.pth")
    assert {(m.model_id, m.role) for m in registry_matches(expert, registry)} == {
        ("test-tiny-i2v-a14b", "transformer_high_noise"), ("test-tiny-i2v-a14b", "transformer_low_noise")}
    custom = identify(root / "Wan2GP/ckpts/wan2.1_text2video_1.3B_bf16.safetensors")
    assert registry_matches(custom, registry) == []
    assert "defaults of its task type (t2v)" in registry_notice(custom, [])
    assert registry_notice(fun, registry_matches(fun, registry)) is None
    vae = identify(root / "comfy/models/text_encoders/clip_vision_h.safetensors")
    assert all(registry.get(m.model_id).vae.version == "2.2" for m in registry_matches(vae, registry))


def test_folder_hints(tmp_path):
    assert folder_hints(tmp_path / "ComfyUI/models/clip_vision/x.safetensors") == ("clip", None)
    assert folder_hints(tmp_path / "ComfyUI/models/clip/x.safetensors") == ("text_encoder", None)
    assert folder_hints(tmp_path / "hub/models--Comfy-Org--Wan_2.1_ComfyUI_repackaged/snapshots/h/split_files/"
                                   "diffusion_models/x.safetensors") == ("dit", "Comfy-Org/Wan_2.1_ComfyUI_repackaged")
    assert folder_hints(tmp_path / "Wan2GP/ckpts/x.pth") == ("wan2gp", None)


def test_identify_reads_no_weights(tree, monkeypatch):
    """Only headers: the loader's tensor reader is never called."""
    import wan.loading.files as files
    root, _ = tree

    def boom(*a, **k):
        raise AssertionError("a tensor was read")
    monkeypatch.setattr(files, "_read_tensor", boom)
    assert identify(root / "comfy/models/vae/wan_2.1_vae.safetensors").kind == "dit"
    assert os.path.exists(root / "comfy/models/vae/wan_2.1_vae.safetensors")
