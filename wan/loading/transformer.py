"""Loading a Wan DiT from any public checkpoint layout.

Layouts: official (single file, shards + index, folder with config.json; Wan 2.2 A14B keeps one
such folder per expert), ComfyUI repackaged single files (optional ``model.diffusion_model.``
prefix; fp8_e4m3fn weights, with or without ``scale_weight`` tensors), diffusers folders and
files, ``.pth`` files. Every hyperparameter comes from tensor shapes; a ``config.json`` may only
confirm them (a contradiction is an error).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Callable, Iterator, Sequence

import torch

from wan.loading.files import FP8_DTYPES, Checkpoint, CheckpointError, materialize, open_checkpoint, weight_reader
from wan.loading.keymaps import DIT_DIFFUSERS, DIT_DIFFUSERS_IGNORED, strip_common_prefix
from wan.models.dit import DiTConfig, WanDiT

log = logging.getLogger(__name__)

HEAD_DIM = 128  # every public Wan DiT
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")
# Tensors of ComfyUI's quantised files that are not weights of the network.
_QUANT_EXTRAS = re.compile(r"(^scaled_fp8$|\.scale_weight$|\.scale_input$)")
_EXPERT_FOLDERS = ("high_noise_model", "low_noise_model")


def load_transformer(path: str | os.PathLike | Sequence, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None, *, num_heads: int | None = None,
                     keep_fp8: bool = False) -> WanDiT:
    """Loads a Wan DiT, ready for inference (eval mode, no grad).

    Args:
        path: a .safetensors/.pth file, a list of shards, or a folder (official, diffusers
            pipeline or transformer folder, or one expert folder of Wan 2.2 A14B).
        device: where the weights go.
        dtype: floating dtype of the weights; None keeps the file's (fp8 files become bfloat16).
            Norms, modulation, time embedding and head stay float32 (as the reference computes them).
        num_heads: only for non-public shapes whose width is not a multiple of 128.
        keep_fp8: linear layers stored in fp8 in the file (ComfyUI fp8 files, with or without
            ``scale_weight``) stay fp8 in memory as quantised layers computing in ``dtype``, instead
            of being dequantised: half the memory of bf16, no requantisation error.
    """
    ckpt = _open(path)
    keys = WanKeys(ckpt)
    cfg = infer_config(keys.shapes(), ckpt.config, num_heads=num_heads, source=str(ckpt.root))
    target = dtype or _default_dtype(ckpt)
    source = f"transformer checkpoint {ckpt.root}"
    fp8 = keys.fp8_linears() if keep_fp8 else {}
    if not fp8:
        return materialize(lambda: WanDiT(cfg), keys.readers(), device=device, dtype=target,
                           keep_fp32=WanDiT.keep_in_fp32, source=source)
    quantized = {f"{name}.{leaf}" for name in fp8 for leaf in ("qweight", "weight_scale")}
    return materialize(lambda: with_fp8_layers(WanDiT(cfg), fp8, target), keys.fp8_readers(fp8), device=device,
                       dtype=target, keep_fp32=WanDiT.keep_in_fp32, keep_dtype=quantized.__contains__,
                       source=source)


def with_fp8_layers(dit: WanDiT, fp8: dict[str, tuple], compute: torch.dtype) -> WanDiT:
    """Replaces (on the meta device) the named linear layers by quantised layers of the file's
    fp8 dtype and scale shape (:func:`fp8_layers_of`), to be filled by ``materialize`` or by
    block streaming."""
    from wan.layers.quant import QuantLinear
    for name, (dtype, scale_shape) in fp8.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = dit.get_submodule(owner_name)
        old = getattr(owner, leaf)
        layer = QuantLinear(old.in_features, old.out_features, "fp8" if scale_shape is None else "fp8_scaled",
                            torch.empty(old.out_features, old.in_features, dtype=dtype),
                            None if scale_shape is None else torch.empty(scale_shape, dtype=torch.float32),
                            None if old.bias is None else torch.empty(old.out_features, dtype=compute),
                            compute)
        setattr(owner, leaf, layer)
    return dit


def _open(path) -> Checkpoint:
    if not isinstance(path, (list, tuple)) and os.path.isdir(path):
        experts = [e for e in _EXPERT_FOLDERS if os.path.isdir(os.path.join(path, e))]
        if experts:
            raise CheckpointError(
                f"transformer checkpoint {path}: this folder holds the two experts of a Wan 2.2 A14B "
                f"model ({', '.join(experts)}); load each expert folder on its own")
    return open_checkpoint(path, subfolder="transformer")


def _default_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype most matrix weights of the file have (fp8 files compute in bfloat16)."""
    counts: dict[torch.dtype, int] = {}
    for key in ckpt.keys():
        if key.endswith(".weight") and len(ckpt.shape(key)) >= 2 and ckpt.dtype(key).is_floating_point:
            counts[ckpt.dtype(key)] = counts.get(ckpt.dtype(key), 0) + 1
    if not counts:
        return torch.float32
    dt = max(counts, key=counts.get)
    return torch.bfloat16 if dt in FP8_DTYPES else dt


class WanKeys:
    """The checkpoint's tensors under official key names, with fp8 weights dequantised."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        raw = ckpt.keys()
        prefix = strip_common_prefix([k for k in raw if k != "scaled_fp8"], _PREFIXES)
        body = [k[len(prefix):] for k in raw if k.startswith(prefix)]
        diffusers = any(k.startswith("condition_embedder.") for k in body)
        self.names: dict[str, str] = {}  # official name -> raw key
        for raw_key, key in zip([k for k in raw if k.startswith(prefix)], body):
            if _QUANT_EXTRAS.search(key) or (diffusers and DIT_DIFFUSERS_IGNORED.search(key)):
                continue
            official = DIT_DIFFUSERS.to_official(key) if diffusers else key
            self.names[official] = raw_key
        self.prefix = prefix
        self._check_family()

    def _check_family(self) -> None:
        if "patch_embedding.weight" in self.names and "head.head.weight" in self.names:
            return
        raise CheckpointError(
            f"transformer checkpoint {self.ckpt.root}: this is not a Wan DiT checkpoint "
            f"(no patch_embedding.weight / head.head.weight; {describe_keys(self.ckpt.keys())})")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.ckpt.shape(raw) for name, raw in self.names.items()}

    def readers(self) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        for name, raw in self.names.items():
            yield name, weight_reader(self.ckpt, raw)

    def fp8_linears(self) -> dict[str, tuple[torch.dtype, tuple[int, ...] | None]]:
        """Linear layers whose weight the file stores in fp8 (layers the network keeps in float32
        excepted): module name -> (fp8 dtype, shape of its scale_weight or None)."""
        out = {}
        for name, raw in self.names.items():
            if name.endswith(".weight") and self.ckpt.dtype(raw) in FP8_DTYPES and len(self.ckpt.shape(raw)) == 2 \
                    and not WanDiT.keep_in_fp32(name):
                scale = raw[: -len(".weight")] + ".scale_weight"
                out[name[: -len(".weight")]] = (self.ckpt.dtype(raw),
                                                self.ckpt.shape(scale) if scale in self.ckpt else None)
        return out

    def fp8_readers(self, fp8: dict) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        """Readers under the quantised layers' names: raw fp8 weights and float32 scales."""
        for name, raw in self.names.items():
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module in fp8:
                yield f"{module}.qweight", (lambda raw=raw: self.ckpt.tensor(raw))
                if fp8[module][1] is not None:
                    scale = raw[: -len(".weight")] + ".scale_weight"
                    yield f"{module}.weight_scale", (lambda scale=scale: self.ckpt.tensor(scale).float())
            else:
                yield name, weight_reader(self.ckpt, raw)


def infer_config(shapes: dict[str, tuple[int, ...]], config_json: dict | None = None, *,
                 num_heads: int | None = None, source: str = "checkpoint") -> DiTConfig:
    """Reads every DiT hyperparameter off official-named tensor shapes."""
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    patch = tuple(patch)
    n_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    heads = num_heads or _heads_from(dim, config_json, source)
    vace = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("vace_blocks.")})
    cfg = DiTConfig(
        dim=dim, num_heads=heads, num_layers=n_layers, in_dim=in_dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        out_dim=shapes["head.head.weight"][0] // (patch[0] * patch[1] * patch[2]),
        patch_size=patch,
        freq_dim=shapes["time_embedding.0.weight"][1],
        text_dim=shapes["text_embedding.0.weight"][1],
        text_len=int((config_json or {}).get("text_len", 512)),
        image_dim=shapes["img_emb.proj.0.weight"][0] if "img_emb.proj.0.weight" in shapes else None,
        image_pos_tokens=shapes["img_emb.emb_pos"][1] if "img_emb.emb_pos" in shapes else None,
        vace_layers=_vace_layers(len(vace), n_layers, config_json),
        vace_in_dim=shapes["vace_patch_embedding.weight"][1] if vace else 96,
        ref_conv_in=shapes["ref_conv.weight"][1] if "ref_conv.weight" in shapes else None,
    )
    _confirm(cfg, config_json, source)
    return cfg


def _heads_from(dim: int, config_json: dict | None, source: str) -> int:
    cj = config_json or {}
    heads = cj.get("num_heads") or cj.get("num_attention_heads")
    if heads:
        return int(heads)
    if dim % HEAD_DIM:
        raise CheckpointError(
            f"transformer checkpoint {source}: width {dim} is not a multiple of head_dim {HEAD_DIM} "
            f"(public Wan DiTs all use 128); pass num_heads= or ship a config.json with num_heads")
    return dim // HEAD_DIM


def _vace_layers(n_vace: int, n_layers: int, config_json: dict | None) -> tuple[int, ...]:
    if not n_vace:
        return ()
    listed = (config_json or {}).get("vace_layers")
    if listed:
        return tuple(int(i) for i in listed)
    # The official VACE models spread their hint layers evenly from layer 0
    # (1.3B: 15 of 30 -> every 2nd; 14B: 8 of 40 -> every 5th).
    step = n_layers // n_vace
    return tuple(range(0, step * n_vace, step))


# Names a config.json may use for a field, official first then diffusers.
_CONFIRMABLE = {
    "dim": ("dim",), "ffn_dim": ("ffn_dim",), "num_layers": ("num_layers",),
    "in_dim": ("in_dim", "in_channels"), "out_dim": ("out_dim", "out_channels"),
    "freq_dim": ("freq_dim",), "text_dim": ("text_dim",),
}


def _confirm(cfg: DiTConfig, config_json: dict | None, source: str) -> None:
    if not config_json:
        return
    for field, names in _CONFIRMABLE.items():
        for name in names:
            if name in config_json and int(config_json[name]) != getattr(cfg, field):
                raise CheckpointError(
                    f"transformer checkpoint {source}: config.json says {name}={config_json[name]}, but the "
                    f"tensor shapes say {field}={getattr(cfg, field)}; the weights do not match their config")


def describe_keys(keys: list[str]) -> str:
    """A short guess of what a checkpoint holds, for error messages."""
    joined = " ".join(keys[:2000])
    guesses = (
        ("decoder.", "it looks like a VAE"),
        ("encoder.block.", "it looks like a T5 text encoder"),
        ("token_embedding.", "it looks like a T5 text encoder"),
        ("visual.", "it looks like a CLIP model"),
        ("vision_model.", "it looks like a CLIP vision model"),
        ("lora_", "it looks like a LoRA"),
        ("double_blocks.", "it looks like a Flux or HunyuanVideo model"),
    )
    for frag, guess in guesses:
        if frag in joined:
            return guess
    sample = ", ".join(keys[:3])
    return f"first keys: {sample}" if sample else "it holds no tensors"


def open_transformer(path: str | os.PathLike | Sequence, *, num_heads: int | None = None, keep_fp8: bool = False
                     ) -> tuple[DiTConfig, dict[str, Callable[[], torch.Tensor]], Checkpoint, torch.dtype]:
    """Opens a DiT checkpoint without loading it, for tools that read it tensor by tensor
    (block streaming in ``wan.optim.offload``).

    Returns:
        the config, one reader per official parameter name (each returns the tensor exactly as
        :func:`load_transformer` would before its dtype/device conversion: fp8 dequantised), the
        open checkpoint, and the dtype :func:`load_transformer` would pick when given none.
        With ``keep_fp8`` (as :func:`load_transformer`'s), the linear layers the file stores in fp8
        are read under the quantised layers' names instead (``<layer>.qweight`` as stored,
        ``<layer>.weight_scale`` in float32): build the network with :func:`with_fp8_layers` then
        (the layers: :func:`fp8_layers_of`).
    """
    ckpt = _open(path)
    keys = WanKeys(ckpt)
    cfg = infer_config(keys.shapes(), ckpt.config, num_heads=num_heads, source=str(ckpt.root))
    fp8 = keys.fp8_linears() if keep_fp8 else {}
    readers = dict(keys.fp8_readers(fp8)) if fp8 else dict(keys.readers())
    return cfg, readers, ckpt, _default_dtype(ckpt)


def fp8_layers_of(path: str | os.PathLike | Sequence) -> dict[str, tuple[torch.dtype, tuple[int, ...] | None]]:
    """The linear layers a DiT file stores in fp8 (the float32 ones excepted): module name ->
    (fp8 dtype, shape of its ``scale_weight`` or None); empty for a file of plain weights. Build
    the network with :func:`with_fp8_layers` to keep them fp8."""
    return WanKeys(_open(path)).fp8_linears()
