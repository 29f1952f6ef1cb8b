"""CLIP vision encoder: parity with transformers' penultimate hidden states, formats, errors.

The tiny open-clip weights are written once in the official Wan layout. The reference is a FULL
``CLIPVisionModel`` (every stored block, post-norm included) given the weights through the
conversion table below (written from the reference doc, §5.3), and fed pixels preprocessed by the
test itself; its ``hidden_states[-2]`` is what Wan uses.
"""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

import wan
from tests.helpers import rel_err
from wan.loading.files import CheckpointError
from wan.testing.tiny_encoders import TINY_CLIP, TINY_CLIP_TOKENS, tiny_clip_state_dict, tiny_t5_state_dict

TOL = 1e-4  # max |ours - ref| / max |ref|, float32
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

# Official per-block names (visual.transformer.i.*) -> transformers names (encoder.layers.i.*).
_BLOCK_TABLE = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}


def official_to_hf(sd: dict) -> dict:
    """Official open-clip visual.* keys -> CLIPVisionModel keys (all blocks, post-norm; no head)."""
    out = {}
    for key, t in sd.items():
        if not key.startswith("visual."):
            continue
        k = key[len("visual."):]
        if k == "cls_embedding":
            out["embeddings.class_embedding"] = t.reshape(-1)
        elif k == "pos_embedding":
            out["embeddings.position_embedding.weight"] = t[0]
        elif k == "patch_embedding.weight":
            out["embeddings.patch_embedding.weight"] = t
        elif k.startswith("pre_norm."):
            out["pre_layrnorm." + k.split(".")[-1]] = t
        elif k.startswith("post_norm."):
            out["post_layernorm." + k.split(".")[-1]] = t
        elif k == "head":
            continue  # the projection is not part of CLIPVisionModel
        else:
            i, name, leaf = re.fullmatch(r"transformer\.(\d+)\.(.+)\.(weight|bias)", k).groups()
            if name == "attn.to_qkv":
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    out[f"encoder.layers.{i}.self_attn.{part}.{leaf}"] = chunk
            else:
                out[f"encoder.layers.{i}.{_BLOCK_TABLE[name]}.{leaf}"] = t
    return {k: v.clone().contiguous() for k, v in out.items()}


def hf_vision_config(heads=TINY_CLIP["heads"]) -> CLIPVisionConfig:
    c = TINY_CLIP
    return CLIPVisionConfig(hidden_size=c["dim"], intermediate_size=c["mlp"], num_hidden_layers=c["layers"],
                            num_attention_heads=heads, image_size=c["image_size"], patch_size=c["patch"],
                            hidden_act="gelu", layer_norm_eps=1e-5)


def reference_features(sd, images, heads=TINY_CLIP["heads"]):
    """hidden_states[-2] of the full reference tower on test-preprocessed pixels; also the last."""
    ref = CLIPVisionModel(hf_vision_config(heads)).eval()
    ref.load_state_dict(official_to_hf(sd), strict=True)
    size = TINY_CLIP["image_size"]
    pixels = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
    pixels = (pixels * 0.5 + 0.5 - MEAN) / STD
    with torch.no_grad():
        hs = ref(pixel_values=pixels, output_hidden_states=True).hidden_states
    return hs[-2], hs[-1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    sd = tiny_clip_state_dict(seed=2)
    path = root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(sd, path)
    return {"pth": path, "sd": sd}


@pytest.fixture(scope="module")
def clip(files):
    return wan.load_clip(files["pth"], device="cpu", dtype=torch.float32)


def _images(b=2, h=40, w=56, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1  # non-square: the resize squashes


def test_matches_penultimate_hidden_states_of_full_reference(clip, files):
    images = _images()
    with torch.no_grad():
        ours = clip(images)
    penultimate, last = reference_features(files["sd"], images)
    assert ours.shape == (2, TINY_CLIP_TOKENS, TINY_CLIP["dim"])
    err = rel_err(ours, penultimate)
    assert err <= TOL, f"rel err {err:.2e}"
    assert rel_err(ours, last) > 1e-2  # really the penultimate block, not the last


def test_batch_items_are_independent_as_flf2v_uses_them(clip):
    first, last = _images(1, seed=6), _images(1, seed=7)
    with torch.no_grad():
        both = clip(torch.cat([first, last]))
        alone = clip(last)
    assert rel_err(both[1:], alone) <= 1e-6


def test_only_the_needed_blocks_are_built_and_loaded(clip):
    assert clip.dims.layers == TINY_CLIP["layers"] and clip.dims.heads == TINY_CLIP["heads"]
    assert clip.image_size == TINY_CLIP["image_size"]
    assert len(clip.model.encoder.layers) == TINY_CLIP["layers"] - 1
    names = [n for n, _ in clip.named_parameters()]
    assert not any("post_layernorm" in n or "head" in n or "textual" in n for n in names)
    assert not clip.training
    for name, t in list(clip.named_parameters()) + list(clip.named_buffers()):
        assert not t.is_meta, name
        assert not t.requires_grad, name
    assert torch.equal(clip.model.embeddings.position_ids[0], torch.arange(TINY_CLIP_TOKENS))


def _comfy_state(sd, dtype=torch.float32):
    """clip_vision_h.safetensors layout: vision_model.* keys, the projection, position ids."""
    state = {"vision_model." + k: v.to(dtype) for k, v in official_to_hf(sd).items()}
    state["visual_projection.weight"] = sd["visual.head"].t().contiguous().to(dtype)
    state["vision_model.embeddings.position_ids"] = torch.arange(TINY_CLIP_TOKENS)[None]
    return state


def test_comfy_safetensors_gives_the_official_output(tmp_path, files, clip):
    save_file(_comfy_state(files["sd"]), tmp_path / "clip_vision_h.safetensors")
    other = wan.load_clip(tmp_path / "clip_vision_h.safetensors")
    images = _images()
    with torch.no_grad():
        err = rel_err(other(images), clip(images))
    assert err <= 1e-6, f"rel err {err:.2e}"


def test_fp16_file_loads_as_float32_or_fp16(tmp_path, files):
    state = _comfy_state(files["sd"], torch.float16)  # the real clip_vision_h.safetensors is fp16
    save_file(state, tmp_path / "clip_vision_h.safetensors")
    c32 = wan.load_clip(tmp_path / "clip_vision_h.safetensors")
    w = c32.model.encoder.layers[0].mlp.fc1.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, state["vision_model.encoder.layers.0.mlp.fc1.weight"].float())
    c16 = wan.load_clip(tmp_path / "clip_vision_h.safetensors", dtype=torch.float16)
    images = _images()
    with torch.no_grad():
        out16 = c16(images)
        err = rel_err(out16.float(), c32(images))
    assert out16.dtype == torch.float16 and err < 1e-2


def test_transformers_folder_config_sets_the_heads(tmp_path, files):
    # A CLIPModel folder: nested vision_config, text tower tensors beside the vision ones.
    folder = tmp_path / "clip-vit-h"
    folder.mkdir()
    vision = hf_vision_config(heads=4).to_dict()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": vision}))
    state = _comfy_state(files["sd"])
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 8)
    state["logit_scale"] = torch.tensor(2.0)
    save_file(state, folder / "model.safetensors")
    c = wan.load_clip(folder)
    assert c.dims.heads == 4
    images = _images()
    with torch.no_grad():
        ours = c(images)
    penultimate, _ = reference_features(files["sd"], images, heads=4)
    err = rel_err(ours, penultimate)
    assert err <= TOL, f"rel err {err:.2e}"


def test_wrong_family_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(tiny_t5_state_dict(0), path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as e:
        wan.load_clip(path)
    assert "CLIP vision" in str(e.value)


def test_bad_image_shape_is_refused(clip):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(2, 4, 32, 32\)"):
        clip(torch.zeros(2, 4, 32, 32))
