"""Loading the umT5 text encoder from any of its public formats.

Formats (detected from the key names, never from the file name):
  - official Wan ``models_t5_umt5-xxl-enc-bf16.pth``: ``token_embedding.weight``, ``blocks.i.*``,
    ``norm.weight``;
  - transformers keys (``umt5_xxl_fp16.safetensors`` of ComfyUI, google/umt5-xxl folders, diffusers
    ``text_encoder/``): ``shared.weight`` and/or ``encoder.embed_tokens.weight``,
    ``encoder.block.i.layer.*``, optionally under a prefix (``text_encoders.umt5xxl.transformer.``,
    ``model.``); decoder tensors, if any, are ignored;
  - ComfyUI fp8 files: float8 weights with optional ``<layer>.scale_weight`` scalars (dequantised
    as ``weight.float() * scale``) and a ``scaled_fp8`` marker key.

Every hyperparameter comes from the tensor shapes; only ``relative_attention_max_distance`` (128)
and the norm eps (1e-6) are invisible there, and a transformers ``config.json`` may set those.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterator

import torch

from wan.loading.files import (Checkpoint, CheckpointError, check_materialized, materialize, open_checkpoint,
                               weight_reader)
from wan.loading.keymaps import KeyMap
from wan.models.text_encoder import TEXT_LEN, T5Dims, TokenizerNotFound, UMT5TextEncoder

# Official Wan T5 names <-> transformers UMT5EncoderModel names.
T5_OFFICIAL_TO_HF = KeyMap(name="umT5 official <-> transformers", pairs=(
    ("token_embedding", "shared"),
    ("blocks.#.norm1", "encoder.block.#.layer.0.layer_norm"),
    ("blocks.#.attn.q", "encoder.block.#.layer.0.SelfAttention.q"),
    ("blocks.#.attn.k", "encoder.block.#.layer.0.SelfAttention.k"),
    ("blocks.#.attn.v", "encoder.block.#.layer.0.SelfAttention.v"),
    ("blocks.#.attn.o", "encoder.block.#.layer.0.SelfAttention.o"),
    ("blocks.#.pos_embedding.embedding", "encoder.block.#.layer.0.SelfAttention.relative_attention_bias"),
    ("blocks.#.norm2", "encoder.block.#.layer.1.layer_norm"),
    ("blocks.#.ffn.gate.0", "encoder.block.#.layer.1.DenseReluDense.wi_0"),  # the GELU branch
    ("blocks.#.ffn.fc1", "encoder.block.#.layer.1.DenseReluDense.wi_1"),
    ("blocks.#.ffn.fc2", "encoder.block.#.layer.1.DenseReluDense.wo"),
    ("norm", "encoder.final_layer_norm"),
))

_OFFICIAL_ANCHOR = "blocks.0.attn.q.weight"
_HF_ANCHOR = "block.0.layer.0.SelfAttention.q.weight"
_HF_STACK_KEY = re.compile(r"^(block\.\d+\..+|final_layer_norm\.weight)$")
# ComfyUI fp8 side tensors: consumed while reading the weight they scale, or unused.
_QUANT_SIDE_KEY = re.compile(r"(^|\.)(scale_weight|scale_input|scaled_fp8)$")


# ---------------------------------------------------------------------------------------------
# Reading one tensor (fp8 dequantisation)


# ---------------------------------------------------------------------------------------------
# Layout detection: transformers name -> checkpoint key


def _find_prefix(keys: list[str], anchor: str) -> str | None:
    """The shortest prefix under which ``anchor`` occurs, or None."""
    found = [k[: -len(anchor)] for k in keys if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == ".")]
    return min(found, key=len) if found else None


def _map_official(ckpt: Checkpoint, prefix: str) -> dict[str, str]:
    mapping, unknown = {}, []
    for key in ckpt.keys():
        if not key.startswith(prefix) or _QUANT_SIDE_KEY.search(key):
            continue
        rest = key[len(prefix):]
        hf = T5_OFFICIAL_TO_HF.from_official(rest)
        if hf == rest:  # no rule renamed it
            unknown.append(key)
        else:
            mapping[hf] = key
    if unknown:
        raise CheckpointError(
            f"text encoder {ckpt.root}: unexpected tensors for an official Wan umT5 file: {', '.join(unknown[:5])}")
    return mapping


def _map_transformers(ckpt: Checkpoint, stack: str) -> dict[str, str]:
    # The stack prefix ends with "encoder." in full models; "shared" sits beside it.
    root = stack[: -len("encoder.")] if stack.endswith("encoder.") else stack
    mapping = {}
    for key in ckpt.keys():
        rest = key[len(stack):]
        if key.startswith(stack) and _HF_STACK_KEY.match(rest) and not _QUANT_SIDE_KEY.search(key):
            mapping["encoder." + rest] = key
    for candidate in (root + "shared.weight", stack + "embed_tokens.weight"):
        if candidate in ckpt:
            mapping["shared.weight"] = candidate
            break
    return mapping


def detect_t5_layout(ckpt: Checkpoint) -> tuple[str, dict[str, str]]:
    """Returns ``(format name, {UMT5EncoderModel name: checkpoint key})``."""
    keys = ckpt.keys()
    prefix = _find_prefix(keys, _OFFICIAL_ANCHOR)
    if prefix is not None:
        return "official", _map_official(ckpt, prefix)
    stack = _find_prefix(keys, _HF_ANCHOR)
    if stack is not None:
        return "transformers", _map_transformers(ckpt, stack)
    sample = ", ".join(k for k in keys[:4] if not _QUANT_SIDE_KEY.search(k))
    raise CheckpointError(
        f"text encoder {ckpt.root}: not a umT5 text encoder checkpoint: expected '{_OFFICIAL_ANCHOR}' "
        f"(official Wan) or '[encoder.]{_HF_ANCHOR}' (transformers/ComfyUI) among its "
        f"{len(keys)} tensors; found keys like {sample}")


# ---------------------------------------------------------------------------------------------
# Hyperparameters from shapes


def infer_t5_dims(ckpt: Checkpoint, mapping: dict[str, str]) -> T5Dims:
    def shape(name: str) -> tuple[int, ...]:
        if name not in mapping:
            raise CheckpointError(f"text encoder {ckpt.root}: missing tensor for '{name}' (transformers name)")
        return ckpt.shape(mapping[name])

    vocab, dim = shape("shared.weight")
    layer_ids = sorted({int(m.group(1)) for n in mapping if (m := re.match(r"encoder\.block\.(\d+)\.", n))})
    if layer_ids != list(range(len(layer_ids))):
        raise CheckpointError(f"text encoder {ckpt.root}: block indices are not 0..n-1: {layer_ids}")
    bias = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
    if len(layer_ids) > 1 and bias.format(1) not in mapping:
        raise CheckpointError(
            f"text encoder {ckpt.root}: block 1 has no relative position bias: this is a T5 with one "
            f"shared bias, not umT5 (Wan's text encoder has one per block)")
    buckets, heads = shape(bias.format(0))
    dim_attn = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    ffn = shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0]
    extra = {}
    cfg = ckpt.config or {}
    if cfg.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise CheckpointError(
            f"text encoder {ckpt.root}/config.json: feed_forward_proj is '{cfg['feed_forward_proj']}', "
            f"umT5 uses 'gated-gelu'")
    if "relative_attention_max_distance" in cfg:
        extra["max_distance"] = int(cfg["relative_attention_max_distance"])
    if "layer_norm_epsilon" in cfg:
        extra["eps"] = float(cfg["layer_norm_epsilon"])
    return T5Dims(vocab=vocab, dim=dim, dim_attn=dim_attn, ffn=ffn, heads=heads, layers=len(layer_ids),
                  buckets=buckets, **extra)


# ---------------------------------------------------------------------------------------------
# Tokenizer lookup


def _is_tokenizer_folder(p: Path) -> bool:
    return p.is_dir() and ((p / "tokenizer.json").exists() or (p / "spiece.model").exists())


def tokenizer_candidates(weights: Path) -> list[Path]:
    """Folders where a tokenizer beside the weights is looked for, in order."""
    base = weights if weights.is_dir() else weights.parent
    out = [base / "google" / "umt5-xxl", base / "umt5-xxl", base / "tokenizer", base]
    if base.name == "text_encoder":  # diffusers pipeline: text_encoder/ and tokenizer/ are siblings
        out.append(base.parent / "tokenizer")
    return out


def _resolve_tokenizer(model: UMT5TextEncoder, weights: Path, tokenizer) -> None:
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        model.set_tokenizer(tokenizer=tokenizer)  # a ready tokenizer object
        return
    if tokenizer is not None:
        folder = Path(tokenizer)
        if not _is_tokenizer_folder(folder):
            raise TokenizerNotFound(
                f"text encoder: tokenizer={folder}: not a tokenizer folder (expected tokenizer.json or "
                f"spiece.model with tokenizer_config.json, as in google/umt5-xxl)")
        model.set_tokenizer(path=folder)
        return
    candidates = tokenizer_candidates(weights)
    found = next((c for c in candidates if _is_tokenizer_folder(c)), None)
    base = weights if weights.is_dir() else weights.parent
    hint = (f"no tokenizer folder beside {weights} (looked in {', '.join(str(c) for c in candidates)}). Put the "
            f"google/umt5-xxl tokenizer files (tokenizer.json or spiece.model, tokenizer_config.json, "
            f"special_tokens_map.json) in {base / 'google' / 'umt5-xxl'} as the official Wan layout does, "
            f"or pass tokenizer=<folder> to load_text_encoder")
    model.set_tokenizer(path=found, hint=hint)


# ---------------------------------------------------------------------------------------------
# Entry point


def load_text_encoder(path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      tokenizer=None, text_len: int = TEXT_LEN) -> UMT5TextEncoder:
    """Loads a umT5 encoder in eval mode.

    Args:
        path: a .pth / .safetensors file, a list of shards, or a folder (transformers or diffusers,
            ``text_encoder/`` is used when present).
        device, dtype: placement and dtype of the weights (dtype None: float32).
        tokenizer: a tokenizer folder or object for ``encode_prompts``; None looks beside the weights
            (``google/umt5-xxl/`` in the official layout). It is loaded on first use only.
        text_len: the fixed token length of ``encode_prompts`` (512 in Wan).
    """
    dtype = dtype or torch.float32
    ckpt = open_checkpoint(path, subfolder="text_encoder")
    _, mapping = detect_t5_layout(ckpt)
    dims = infer_t5_dims(ckpt, mapping)
    built: list[UMT5TextEncoder] = []

    def factory() -> UMT5TextEncoder:
        built.append(UMT5TextEncoder(dims, text_len=text_len))
        return built[0]

    def tensors() -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        yield "model.shared.weight", weight_reader(ckpt, mapping["shared.weight"])
        # The tied copy: hand back the tensor just placed, so it is never read or stored twice.
        yield "model.encoder.embed_tokens.weight", lambda: built[0].model.shared.weight
        for name, key in mapping.items():
            if name != "shared.weight":
                yield "model." + name, weight_reader(ckpt, key)

    model = materialize(factory, tensors(), device=device, dtype=dtype, source=f"text encoder {ckpt.root}")
    model.tie_embeddings()
    check_materialized(model, f"text encoder {ckpt.root}")
    _resolve_tokenizer(model, Path(path[0] if isinstance(path, (list, tuple)) else path), tokenizer)
    return model
