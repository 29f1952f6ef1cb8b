"""Loading the CLIP image tower (Wan 2.1 i2v / flf2v) from any of its public formats.

Formats (detected from the key names):
  - official Wan ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``: the whole open-clip
    model (``visual.*``, ``textual.*``, ``log_scale``); only ``visual.*`` is read;
  - transformers keys: ComfyUI ``clip_vision_h.safetensors`` (``vision_model.*``, maybe
    ``visual_projection``), a transformers ``CLIPModel`` / ``CLIPVisionModel`` folder, diffusers
    ``image_encoder/``.

Only the blocks before the last one are read (the output is the penultimate block's states); the
last block, the post-norm, the projection head and the text tower stay on disk.
Heads are not visible in the shapes: a config.json is believed, else the open-clip ViT convention
of 80-wide heads (ViT-H/14: 1280 / 80 = 16 heads).
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch

from wan.loading.files import (Checkpoint, CheckpointError, check_materialized, materialize, open_checkpoint,
                               weight_reader)
from wan.models.clip_vision import ClipDims, ClipVisionEncoder

OPEN_CLIP_HEAD_DIM = 80

_OFFICIAL_ANCHOR = "transformer.0.attn.to_qkv.weight"
_HF_ANCHOR = "embeddings.patch_embedding.weight"

# Per-block official names -> transformers names (the fused to_qkv is handled apart).
_OFFICIAL_BLOCK = {
    "norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
    "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2",
}

# (transformers name, checkpoint key, transform or None)
Plan = list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor] | None]]


def _find_prefix(keys: list[str], anchor: str) -> str | None:
    found = [k[: -len(anchor)] for k in keys if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == ".")]
    return min(found, key=len) if found else None


def _count_blocks(ckpt: Checkpoint, pattern: str) -> int:
    ids = sorted({int(m.group(1)) for k in ckpt.keys() if (m := re.match(pattern, k))})
    if ids != list(range(len(ids))):
        raise CheckpointError(f"CLIP vision {ckpt.root}: block indices are not 0..n-1: {ids}")
    return len(ids)


def _require(ckpt: Checkpoint, key: str) -> str:
    if key not in ckpt:
        raise CheckpointError(f"CLIP vision {ckpt.root}: missing tensor '{key}'")
    return key


def _official_plan(ckpt: Checkpoint, p: str, layers: int) -> Plan:
    plan: Plan = [
        ("embeddings.class_embedding", _require(ckpt, p + "cls_embedding"), lambda t: t.reshape(-1)),
        ("embeddings.patch_embedding.weight", _require(ckpt, p + "patch_embedding.weight"), None),
        ("embeddings.position_embedding.weight", _require(ckpt, p + "pos_embedding"), lambda t: t.reshape(t.shape[-2:])),
        ("pre_layrnorm.weight", _require(ckpt, p + "pre_norm.weight"), None),
        ("pre_layrnorm.bias", _require(ckpt, p + "pre_norm.bias"), None),
    ]
    for i in range(layers - 1):  # the last stored block is not used
        src, dst = f"{p}transformer.{i}.", f"encoder.layers.{i}."
        for official, hf in _OFFICIAL_BLOCK.items():
            for leaf in ("weight", "bias"):
                plan.append((f"{dst}{hf}.{leaf}", _require(ckpt, f"{src}{official}.{leaf}"), None))
        for leaf in ("weight", "bias"):
            fused = _require(ckpt, f"{src}attn.to_qkv.{leaf}")
            for j, name in enumerate("qkv"):  # rows are q, then k, then v
                # clone: keep only this third, not a view holding the whole fused tensor alive
                plan.append((f"{dst}self_attn.{name}_proj.{leaf}", fused,
                             lambda t, j=j: t.chunk(3, dim=0)[j].clone()))
    return plan


def _transformers_plan(ckpt: Checkpoint, p: str, layers: int) -> Plan:
    names = ["embeddings.class_embedding", "embeddings.patch_embedding.weight",
             "embeddings.position_embedding.weight", "pre_layrnorm.weight", "pre_layrnorm.bias"]
    for i in range(layers - 1):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"encoder.layers.{i}.{part}.weight", f"encoder.layers.{i}.{part}.bias"]
    return [(n, _require(ckpt, p + n), None) for n in names]


def _heads(ckpt: Checkpoint, dim: int) -> tuple[int, str | None, float | None]:
    """Heads, activation and eps from a config.json if any, else the open-clip convention."""
    cfg = ckpt.config or {}
    cfg = cfg.get("vision_config", cfg)  # a CLIPModel config nests the vision part
    heads = cfg.get("num_attention_heads")
    if heads is None:
        if dim % OPEN_CLIP_HEAD_DIM:
            raise CheckpointError(
                f"CLIP vision {ckpt.root}: width {dim} is not a multiple of {OPEN_CLIP_HEAD_DIM}, so the "
                f"head count cannot be inferred; put a config.json with num_attention_heads beside it")
        heads = dim // OPEN_CLIP_HEAD_DIM
    return int(heads), cfg.get("hidden_act"), cfg.get("layer_norm_eps")


def detect_clip_layout(ckpt: Checkpoint) -> tuple[ClipDims, Plan]:
    """Returns the stored tower's dims and the reading plan for its first ``layers - 1`` blocks."""
    keys = ckpt.keys()
    official = _find_prefix(keys, _OFFICIAL_ANCHOR)
    hf = None if official is not None else _find_prefix(keys, _HF_ANCHOR)
    if official is not None:
        p = official
        layers = _count_blocks(ckpt, re.escape(p) + r"transformer\.(\d+)\.")
        patch_key, pos_key, fc1_key = p + "patch_embedding.weight", p + "pos_embedding", p + "transformer.0.mlp.0.weight"
    elif hf is not None:
        p = hf
        layers = _count_blocks(ckpt, re.escape(p) + r"encoder\.layers\.(\d+)\.")
        patch_key, pos_key = p + "embeddings.patch_embedding.weight", p + "embeddings.position_embedding.weight"
        fc1_key = p + "encoder.layers.0.mlp.fc1.weight"
    else:
        sample = ", ".join(keys[:4])
        raise CheckpointError(
            f"CLIP vision {ckpt.root}: not a CLIP vision checkpoint: expected 'visual.{_OFFICIAL_ANCHOR}' "
            f"(official Wan open-clip) or '[vision_model.]{_HF_ANCHOR}' (transformers/ComfyUI) among its "
            f"{len(keys)} tensors; found keys like {sample}")

    dim, _, patch, _ = ckpt.shape(_require(ckpt, patch_key))
    positions = ckpt.shape(_require(ckpt, pos_key))[-2]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise CheckpointError(
            f"CLIP vision {ckpt.root}: {positions} position embeddings is not 1 + a square grid")
    heads, act, eps = _heads(ckpt, dim)
    extra = {k: v for k, v in (("act", act), ("eps", eps)) if v is not None}
    dims = ClipDims(dim=dim, heads=heads, layers=layers, mlp=ckpt.shape(_require(ckpt, fc1_key))[0],
                    patch=patch, image_size=grid * patch, **extra)
    if layers < 2:
        raise CheckpointError(f"CLIP vision {ckpt.root}: {layers} block(s); the penultimate output needs 2 or more")
    plan = _official_plan(ckpt, p, layers) if official is not None else _transformers_plan(ckpt, p, layers)
    return dims, plan


def load_clip(path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> ClipVisionEncoder:
    """Loads the CLIP image tower in eval mode (dtype None: float32).

    ``path``: a .pth / .safetensors file, a list of shards, or a folder (``image_encoder/`` of a
    diffusers pipeline is used when present).
    """
    dtype = dtype or torch.float32
    ckpt = open_checkpoint(path, subfolder="image_encoder")
    dims, plan = detect_clip_layout(ckpt)
    tensors = (("model." + name, weight_reader(ckpt, key, transform)) for name, key, transform in plan)
    model = materialize(lambda: ClipVisionEncoder(dims), tensors, device=device, dtype=dtype,
                        source=f"CLIP vision {ckpt.root}")
    model.init_constants()
    check_materialized(model, f"CLIP vision {ckpt.root}")
    return model
