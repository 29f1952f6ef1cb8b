"""What a checkpoint file is, told from its tensors alone (names, shapes, dtypes), never its name.

Only headers are read: the safetensors JSON header (with the strict checks of
:func:`wan.loading.files.read_safetensors_header`), or a ``.pth`` opened memory-mapped with
``weights_only=True`` (a pickle that needs code is refused, never executed). No weight is read.

``identify(path)`` answers one :class:`Identity`:

- ``dit``: a Wan DiT, with its variant, size, precision, key layout and the ``DiTConfig`` the
  loader would build (from :func:`wan.loading.transformer.infer_config`, the loader's own code);
- ``vae`` (version 2.1 / 2.2), ``text_encoder`` (umT5) or ``clip`` (the CLIP image tower);
- ``lora``: any LoRA-style file (the LoRA library parses it fully);
- ``other``: a tensor file that is not a Wan file, with its ``family`` when it is easy to tell;
- ``unreadable``: truncated, not a tensor file, a refused pickle, ...; ``reason`` says why.

``registry_matches(identity, registry)`` lists the registry models (and the role) whose
architecture a file fits. Walking whole folders is :mod:`wan.loading.model_folders`.

Shapes cannot tell apart models that share an architecture: Wan 2.1 i2v 14B and Fun InP 14B,
i2v 480P and 720P, Wan 2.1 t2v 14B and either expert of Wan 2.2 t2v A14B, or the high-noise and
the low-noise expert of one A14B pair. ``variant`` is the likeliest reading, ``alternatives``
and ``expert`` say what else it may be, and ``registry_matches`` returns every fitting model.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable

import torch

from wan.loading.files import (ST_DTYPES, FP8_DTYPES, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, Checkpoint,
                               CheckpointError, files_from_index, open_checkpoint, read_safetensors_header)
from wan.loading.transformer import HEAD_DIM, WanKeys, infer_config
from wan.loading.vae import KNOWN_PREFIXES as KNOWN_VAE_PREFIXES
from wan.loading.vae import official_names as vae_official_names
from wan.loading.vae import infer_vae_config
from wan.models.dit import DiTConfig
from wan.registry.specs import VAE_SHAPES, ModelSpec, Registry

KINDS = ("dit", "vae", "text_encoder", "clip", "lora", "other", "unreadable")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
INDEX_SUFFIX = ".index.json"
# A pre-1.6 (non-zip) pickle cannot be memory-mapped: torch reads all of it. Above this size such a
# file is listed as unreadable rather than read whole during a scan.
LEGACY_PICKLE_LIMIT = 64 << 20

# (dim, num_layers, ffn_dim) of the public sizes. An A14B expert is a 14B network.
PUBLIC_SIZES = {(1536, 30, 8960): "1.3B", (5120, 40, 13824): "14B", (3072, 30, 14336): "5B"}

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2"}
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")


@dataclass(frozen=True)
class Identity:
    """What one file (or one sharded model, through its index) is.

    Attributes:
        kind: one of :data:`KINDS`.
        reason: for ``other`` / ``unreadable``, why (one line); empty otherwise.
        family: for ``other`` and ``lora``: "flux", "hunyuan", "sd", "sdxl", "sd3", "t5", "clip_text",
            "wan" (LoRAs), or None when unknown.
        precision: dtype of most matrix weights: bf16, fp16, fp32, fp8_e4m3fn, fp8_e5m2 or
            fp8_scaled (fp8 with ComfyUI ``scale_weight`` tensors).
        layout: key layout: "official", "comfyui" (``model.diffusion_model.`` prefix or scaled
            fp8), "diffusers" (DiT, VAE) or "transformers" (umT5, CLIP); None for other kinds.
        prefix: the common key prefix that was stripped ("" if none).
        variant: DiT: t2v, i2v, flf2v, fun_inp, fun_control, vace or ti2v.
        alternatives: other variants with the same shapes (i2v <-> fun_inp).
        expert: DiT: None (a single model), "pair_member" (one expert of a Wan 2.2 A14B pair;
            high or low noise cannot be told from shapes) or "possible" (the shapes of a single
            model and of an A14B expert are the same: Wan 2.1 t2v 14B vs Wan 2.2 t2v A14B).
        size_label: DiT: "1.3B", "5B", "14B" or "custom"; umT5: "xxl" or "custom"; CLIP: "ViT-H/14"
            or "custom".
        dim, num_layers: width and depth (DiT, umT5, CLIP).
        num_params: number of weights (scale tensors excluded).
        dit: the DiTConfig the loader builds for this file.
        version: VAE: "2.1" or "2.2".
        rank: LoRA: rank of its first low-rank pair (None for LyCORIS / diff-only files).
        files: the weight files read (several for an index).
        notes: explanations a user should see (ambiguities, non-registry shapes).
    """

    kind: str
    reason: str = ""
    family: str | None = None
    precision: str | None = None
    layout: str | None = None
    prefix: str = ""
    variant: str | None = None
    alternatives: tuple[str, ...] = ()
    expert: str | None = None
    size_label: str | None = None
    dim: int | None = None
    num_layers: int | None = None
    num_params: int | None = None
    dit: DiTConfig | None = None
    version: str | None = None
    rank: int | None = None
    files: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for listings."""
        if self.kind in ("other", "unreadable"):
            fam = f" ({self.family})" if self.family else ""
            return f"{self.kind}{fam}: {self.reason}"
        parts = [self.kind, self.variant, self.size_label, self.version and f"Wan {self.version}",
                 self.precision, self.layout, self.family, self.rank and f"rank {self.rank}",
                 self.expert and f"expert: {self.expert}"]
        return " ".join(str(p) for p in parts if p)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["dit"] = asdict(self.dit) if self.dit else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Identity":
        d = dict(d)
        for name in ("alternatives", "files", "notes"):
            d[name] = tuple(d.get(name) or ())
        if d.get("dit"):
            cfg = dict(d["dit"])
            cfg["patch_size"] = tuple(cfg["patch_size"])
            cfg["vace_layers"] = tuple(cfg["vace_layers"])
            d["dit"] = DiTConfig(**cfg)
        return cls(**d)


@dataclass(frozen=True)
class Match:
    """A registry model whose architecture a file fits, and the file's role in it."""

    model_id: str
    role: str


# ---------------------------------------------------------------------------------------------
# Identify one file


def identify(path: str | os.PathLike) -> Identity:
    """Identifies one file (``.safetensors``/``.sft``/``.pth``/``.pt``/``.ckpt``/``.bin``, or an
    ``*.index.json`` of shards, identified as the whole model) from its tensor headers.

    Never raises for a bad file: the answer is then ``kind="unreadable"`` with a reason.
    """
    path = Path(path)
    try:
        ckpt = _open_header(path)
    except CheckpointError as e:
        return Identity("unreadable", reason=_short_reason(str(e), path))
    except OSError as e:
        return Identity("unreadable", reason=f"cannot read the file ({e.strerror or e})")
    try:
        return identify_checkpoint(ckpt)
    except Exception as e:  # noqa: BLE001  a header that passed the reader but breaks a detector
        return Identity("unreadable", reason=f"{type(e).__name__}: {str(e)[:200]}")


class _Header:
    """The names, shapes and dtypes of safetensors files, read with the loader's strict header
    reader; answers what the detectors ask of a :class:`Checkpoint` (keys, shape, dtype, ``in``)
    without building a tensor reader per entry."""

    def __init__(self, files: list[Path]):
        self.files, self.root, self.config = files, files[0], None
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype | None] = {}
        for f in files:
            header, _ = read_safetensors_header(f)
            header.pop("__metadata__", None)
            dup = next((k for k in header if k in self._shape), None)
            if dup is not None:
                raise CheckpointError(f"checkpoint shard {f}: tensor {dup} is also in another shard")
            for key, info in header.items():
                self._shape[key] = tuple(info["shape"])
                self._dtype[key] = ST_DTYPES.get(info["dtype"])  # None: a dtype torch cannot hold

    def keys(self) -> list[str]:
        return list(self._shape)

    def __contains__(self, key: str) -> bool:
        return key in self._shape

    def __len__(self) -> int:
        return len(self._shape)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shape[key]

    def dtype(self, key: str) -> torch.dtype | None:
        return self._dtype[key]


def _open_header(path: Path) -> Checkpoint | _Header:
    if path.name.endswith(INDEX_SUFFIX):
        files = files_from_index(path)
        if all(f.suffix in SAFETENSORS_SUFFIXES for f in files):
            return _Header(files)
        return open_checkpoint(files)
    if path.suffix in SAFETENSORS_SUFFIXES:
        return _Header([path])
    if path.suffix in PICKLE_SUFFIXES and path.stat().st_size > LEGACY_PICKLE_LIMIT \
            and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path}: a legacy (pre-zip) pickle: it cannot be memory-mapped, so telling what "
            f"it is would read all its weights; not identified")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"checkpoint {path}: not a weight file type ({', '.join(WEIGHT_SUFFIXES)})")
    return open_checkpoint(path)


def _short_reason(message: str, path: Path) -> str:
    """The loader's message without the leading "checkpoint <path>: " (the listing shows the path)."""
    for lead in (f"checkpoint {path}: ", f"shard index {path} ", f"{path}: "):
        if message.startswith(lead):
            return message[len(lead):]
    return message


def identify_checkpoint(ckpt: Checkpoint) -> Identity:
    """Identifies an open checkpoint (its header only is used)."""
    keys = ckpt.keys()
    files = tuple(str(f) for f in ckpt.files) if len(ckpt.files) > 1 else ()
    if not keys:
        return Identity("other", reason="holds no tensors", files=files)
    precision = _precision(ckpt, keys)
    lora = _lora(ckpt, keys)
    if lora is not None:
        return _with(lora, precision=precision, files=files)
    for detect in (_dit, _vae, _text_encoder, _clip):
        found = detect(ckpt, keys)
        if found is not None:
            return _with(found, precision=precision, files=files)
    family, what = _other_family(keys)
    reason = f"not a Wan file: {what}" if what else f"not a Wan file ({len(keys)} tensors, first: {keys[0]})"
    return Identity("other", reason=reason, family=family, precision=precision, files=files)


def _with(identity: Identity, **changes) -> Identity:
    d = {f.name: getattr(identity, f.name) for f in fields(identity)}
    d.update({k: v for k, v in changes.items() if k not in d or d[k] in (None, (), "")})
    return Identity(**d)


def _is_scale(key: str) -> bool:
    """A ComfyUI quantisation side tensor (not a weight of the network)."""
    return key.endswith(_SCALE_SUFFIXES) or key == "scaled_fp8"


def _precision(ckpt: Checkpoint, keys: list[str]) -> str | None:
    """The dtype most matrix weights have; fp8 with ComfyUI scale tensors is ``fp8_scaled``."""
    counts: Counter = Counter()
    for k in keys:
        dt = ckpt.dtype(k)
        if dt is not None and dt.is_floating_point and len(ckpt.shape(k)) >= 2:
            counts[dt] += 1
    if not counts:
        counts.update(dt for k in keys if (dt := ckpt.dtype(k)) is not None and dt.is_floating_point)
    if not counts:
        return None
    dt = counts.most_common(1)[0][0]
    if dt in FP8_DTYPES and any(k.endswith(".scale_weight") or k == "scaled_fp8" for k in keys):
        return "fp8_scaled"
    return _DTYPE_NAMES.get(dt, str(dt).removeprefix("torch."))


def _num_params(ckpt: Checkpoint, keys: Iterable[str]) -> int:
    total = 0
    for k in keys:
        if not _is_scale(k):
            n = 1
            for s in ckpt.shape(k):
                n *= s
            total += n
    return total


# ---------------------------------------------------------------------------------------------
# DiT


def size_label(dim: int, num_layers: int, ffn_dim: int) -> str:
    """"1.3B", "5B", "14B" for the public shapes, else "custom"."""
    return PUBLIC_SIZES.get((dim, num_layers, ffn_dim), "custom")


def classify_dit(shapes: dict[str, tuple[int, ...]], config_json: dict | None = None,
                 source: str = "checkpoint") -> Identity:
    """A DiT identity from official-named tensor shapes (no file needed: tests pass shape dicts).

    Raises whatever :func:`infer_config` raises when a tensor it needs is missing.
    """
    notes = []
    dim = shapes["patch_embedding.weight"][0]
    heads = None
    if dim % HEAD_DIM and not (config_json or {}).get("num_heads"):
        heads = 1  # not visible in shapes; any divisor builds the same tensors
        notes.append(f"width {dim} is not a multiple of {HEAD_DIM}: the head count is not visible in the "
                     f"shapes (num_heads=1 is shown)")
    cfg = infer_config(shapes, config_json, num_heads=heads, source=source)
    size = size_label(cfg.dim, cfg.num_layers, cfg.ffn_dim)
    alternatives: tuple[str, ...] = ()
    expert = None
    if cfg.vace_layers:
        variant = "vace"
    elif cfg.image_pos_tokens:
        variant = "flf2v"
    elif cfg.ref_conv_in or (cfg.in_dim == 48 and cfg.out_dim == 16):
        variant = "fun_control"
    elif cfg.out_dim == 48:
        variant = "ti2v"
    elif cfg.in_dim == 36 and cfg.image_dim:
        # Fun InP has the shapes of Wan 2.1 i2v; there is no official i2v at 1.3B.
        variant, alternatives = ("fun_inp", ("i2v",)) if size == "1.3B" else ("i2v", ("fun_inp",))
        notes.append("Wan 2.1 i2v and Fun InP models have the same tensor shapes: either may be meant")
    elif cfg.in_dim == 36:
        variant, expert = "i2v", "pair_member"
        notes.append("image latents without CLIP: one expert of a Wan 2.2 i2v A14B pair; whether it is the "
                     "high-noise or the low-noise expert cannot be told from the tensors")
    else:
        variant = "t2v"
        if size == "14B":
            expert = "possible"
            notes.append("a single t2v model (Wan 2.1 t2v / t2i 14B) and either expert of a Wan 2.2 t2v A14B "
                         "pair have the same tensors: which one it is, and high vs low noise, cannot be told "
                         "from them")
    if size == "custom":
        notes.append(f"a Wan DiT of a size no public model has (dim {cfg.dim}, {cfg.num_layers} layers, "
                     f"ffn {cfg.ffn_dim}): another size or a finetune")
    return Identity("dit", variant=variant, alternatives=alternatives, expert=expert, size_label=size,
                    dim=cfg.dim, num_layers=cfg.num_layers, dit=cfg, notes=tuple(notes))


def _dit(ckpt: Checkpoint, keys: list[str]) -> Identity | None:
    try:
        wk = WanKeys(ckpt)
    except CheckpointError:
        return None
    shapes = wk.shapes()
    try:
        found = classify_dit(shapes, None, source=str(ckpt.root))
    except (KeyError, ValueError, IndexError) as e:
        missing = f"tensor {e.args[0]} is missing" if isinstance(e, KeyError) else str(e)[:200]
        return Identity("unreadable", reason=f"a Wan DiT whose tensors are incomplete or inconsistent: {missing}")
    diffusers = any(k.startswith("condition_embedder.") for k in (r[len(wk.prefix):] for r in keys))
    scaled = any(k.endswith(".scale_weight") or k == "scaled_fp8" for k in keys)
    if diffusers:
        layout = "diffusers"
    elif wk.prefix in ("model.diffusion_model.", "diffusion_model.") or scaled:
        layout = "comfyui"
    else:
        layout = "official"
    return _with(found, layout=layout, prefix=wk.prefix, num_params=_num_params(ckpt, wk.names.values()))


# ---------------------------------------------------------------------------------------------
# VAE, umT5, CLIP


def _vae(ckpt: Checkpoint, keys: list[str]) -> Identity | None:
    if not any(k.endswith(("decoder.conv1.weight", "decoder.conv_in.weight")) for k in keys):
        return None
    try:
        names = vae_official_names(ckpt, str(ckpt.root))
        version, config = infer_vae_config({k: ckpt.shape(src) for k, src in names.items()}, str(ckpt.root))
    except (CheckpointError, KeyError, ValueError, IndexError):
        return None  # decoder.conv_in of an SD / Flux image VAE: reported by _other_family
    z = VAE_SHAPES[version][1]
    if config["z_dim"] != z:
        return Identity("other", reason=f"a VAE in the Wan {version} layout with {config['z_dim']} latent "
                        f"channels (Wan {version} has {z})")
    diffusers = any(k.endswith("decoder.conv_in.weight") for k in keys)
    prefix = next((p for p in KNOWN_VAE_PREFIXES if p + "decoder.conv1.weight" in ckpt
                   or p + "decoder.conv_in.weight" in ckpt), "")
    return Identity("vae", version=version, layout="diffusers" if diffusers else "official", prefix=prefix,
                    dim=config["dim"], num_params=_num_params(ckpt, names.values()))


# Anchors of the loaders (wan/loading/text_encoder.py, clip.py). Those modules import
# transformers (seconds) at import time; a scan must not, so the few shape reads are done here.
_T5_OFFICIAL = "blocks.0.attn.q.weight"
_T5_HF = "block.0.layer.0.SelfAttention.q.weight"
_CLIP_OFFICIAL = "transformer.0.attn.to_qkv.weight"
_CLIP_HF = "embeddings.patch_embedding.weight"


def _find_prefix(keys: list[str], anchor: str) -> str | None:
    found = [k[: -len(anchor)] for k in keys if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == ".")]
    return min(found, key=len) if found else None


def _count(keys: list[str], pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def _text_encoder(ckpt: Checkpoint, keys: list[str]) -> Identity | None:
    p = _find_prefix(keys, _T5_OFFICIAL)
    if p is not None and p + "token_embedding.weight" in ckpt:
        layout, embed = "official", p + "token_embedding.weight"
        layers = _count(keys, re.escape(p) + r"blocks\.(\d+)\.")
        own_bias = p + "blocks.1.pos_embedding.embedding.weight" in ckpt
    else:
        stack = _find_prefix(keys, _T5_HF)
        if stack is None:
            return None
        root = stack[: -len("encoder.")] if stack.endswith("encoder.") else stack
        embed = next((k for k in (root + "shared.weight", stack + "embed_tokens.weight") if k in ckpt), None)
        if embed is None:
            return None
        layout, p = "transformers", root
        layers = _count(keys, re.escape(stack) + r"block\.(\d+)\.")
        own_bias = stack + "block.1.layer.0.SelfAttention.relative_attention_bias.weight" in ckpt
    vocab, dim = ckpt.shape(embed)
    if layers > 1 and not own_bias:
        return Identity("other", family="t5", reason=f"a T5 encoder ({layers} layers, width {dim}) with one shared "
                        f"position bias: T5 v1.1 (Flux, SD3), not Wan's umT5")
    label = "xxl" if (vocab, dim, layers) == (256384, 4096, 24) else "custom"
    return Identity("text_encoder", layout=layout, prefix=p, size_label=label, dim=dim, num_layers=layers,
                    num_params=_num_params(ckpt, keys),
                    notes=() if label == "xxl" else (f"umT5 of another size (vocab {vocab}, width {dim}, "
                                                     f"{layers} layers; Wan uses umT5-XXL)",))


def _clip(ckpt: Checkpoint, keys: list[str]) -> Identity | None:
    p = _find_prefix(keys, _CLIP_OFFICIAL)
    if p is not None and p + "patch_embedding.weight" in ckpt:
        layout, patch_key = "official", p + "patch_embedding.weight"
        layers = _count(keys, re.escape(p) + r"transformer\.(\d+)\.")
    else:
        p = _find_prefix(keys, _CLIP_HF)
        if p is None:
            return None
        layout, patch_key = "transformers", p + _CLIP_HF
        layers = _count(keys, re.escape(p) + r"encoder\.layers\.(\d+)\.")
    dim, _, patch, _ = ckpt.shape(patch_key)
    label = "ViT-H/14" if (dim, layers, patch) == (1280, 32, 14) else "custom"
    notes = () if label != "custom" else (f"a CLIP vision tower of another size (width {dim}, {layers} blocks, "
                                          f"patch {patch}); Wan i2v / flf2v use ViT-H/14",)
    return Identity("clip", layout=layout, prefix=p, size_label=label, dim=dim, num_layers=layers,
                    num_params=_num_params(ckpt, [k for k in keys if k.startswith(p)]), notes=notes)


# ---------------------------------------------------------------------------------------------
# LoRA and other families (key patterns only)

_LORA_KEY = re.compile(r"(^|[._])(lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up|hada_w[12]_[ab]|lokr_w[12]"
                       r"(_[ab])?)(\.|$)|\.diff(_b)?$")
_LORA_RANK = re.compile(r"(^|[._])(lora_down|lora_A|lora\.down)(\.default)?\.weight$")
_WAN_LORA = re.compile(r"(^|[._])(vace_)?blocks[._]\d+[._](self_attn|cross_attn|ffn|attn1|attn2)")

# (family, description, patterns that must all occur in some key), first match wins.
_FAMILIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("hunyuan", "a HunyuanVideo transformer", (r"(^|\.)double_blocks\.\d+\.img_attn_qkv\.",)),
    ("hunyuan", "a HunyuanVideo transformer", (r"(^|\.)txt_in\.individual_token_refiner\.",)),
    ("hunyuan", "a HunyuanVideo transformer (diffusers)", (r"(^|\.)context_embedder\.token_refiner\.",)),
    ("flux", "a Flux transformer", (r"(^|\.)double_blocks\.\d+\.img_attn\.qkv\.", r"(^|\.)single_blocks\.")),
    ("flux", "a Flux transformer (diffusers)", (r"(^|\.)single_transformer_blocks\.", r"(^|\.)x_embedder\.")),
    ("sd3", "an SD3 transformer", (r"(^|\.)joint_blocks\.\d+\.",)),
    ("sdxl", "an SDXL UNet", (r"(^|\.)input_blocks\.\d+\.", r"(^|\.)label_emb\.")),
    ("sdxl", "an SDXL UNet (diffusers)", (r"(^|\.)down_blocks\.\d+\.", r"(^|\.)add_embedding\.")),
    ("sd", "a Stable Diffusion UNet", (r"(^|\.)input_blocks\.\d+\.",)),
    ("sd", "an SD / Flux image VAE", (r"(^|\.)encoder\.down\.\d+\.block\.",)),
    ("sd", "a Stable Diffusion VAE or UNet (diffusers)", (r"(^|\.)down_blocks\.\d+\.", r"(^|\.)conv_in\.")),
    ("clip_text", "a CLIP text encoder", (r"(^|\.)text_model\.encoder\.layers\.",)),
    ("t5", "a T5 encoder", (r"(^|\.)encoder\.block\.\d+\.layer\.",)),
)
_FAMILY_RES = tuple((fam, what, tuple(re.compile(p) for p in pats)) for fam, what, pats in _FAMILIES)


def _maybe_lora(key: str) -> bool:
    """A cheap first test before the pattern (a DiT has ~1500 keys, all looked at)."""
    return "lora" in key or "hada_w" in key or "lokr_w" in key or key.endswith((".diff", ".diff_b"))


def _lora(ckpt: Checkpoint, keys: list[str]) -> Identity | None:
    if not any(_maybe_lora(k) and _LORA_KEY.search(k) for k in keys):
        return None
    rank = next((ckpt.shape(k)[0] for k in keys if _LORA_RANK.search(k) and ckpt.shape(k)), None)
    if any(_WAN_LORA.search(k) for k in keys):
        family = "wan"
    else:
        family = _other_family(keys)[0]
    notes = () if family == "wan" else ("not a Wan LoRA: its keys name no Wan DiT blocks",)
    return Identity("lora", family=family, rank=rank, num_params=_num_params(ckpt, keys), notes=notes)


def _other_family(keys: list[str]) -> tuple[str | None, str | None]:
    for fam, what, patterns in _FAMILY_RES:
        if all(any(p.search(k) for k in keys) for p in patterns):
            return fam, what
    return None, None


# ---------------------------------------------------------------------------------------------
# Registry


def _arch_key(cfg: DiTConfig) -> tuple:
    """The fields of a DiTConfig that tensor shapes show (heads and VACE positions do not)."""
    return (cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.in_dim, cfg.out_dim, tuple(cfg.patch_size), cfg.freq_dim,
            cfg.text_dim, cfg.image_dim, cfg.image_pos_tokens, len(cfg.vace_layers),
            cfg.vace_in_dim if cfg.vace_layers else None, cfg.ref_conv_in)


def registry_matches(identity: Identity, registry: Registry) -> list[Match]:
    """Registry models whose architecture the file fits, each with the file's role.

    A DiT fits every model whose ``dit_config()`` has the same shapes (i2v 480P and 720P, i2v and
    Fun InP, t2v 14B and both experts of t2v A14B are all returned); an A14B expert is listed under
    both expert roles, since shapes do not tell them apart. A VAE fits every model of its version.
    An empty list for a DiT means a finetune or another size: it runs with its task type's defaults.
    """
    out: list[Match] = []
    if identity.kind == "dit" and identity.dit is not None:
        key = _arch_key(identity.dit)
        for spec in registry.list():
            if _arch_key(_spec_config(spec)) == key:
                out.extend(Match(spec.id, role) for role in spec.transformer_roles)
    elif identity.kind == "vae":
        out.extend(Match(spec.id, "vae") for spec in registry.list() if spec.vae.version == identity.version)
    return out


def _task_key(cfg: DiTConfig) -> tuple:
    """What a DiT's task type shows in its shapes, size left out: inputs, outputs, patch, text and image
    conditioning, whether it has VACE blocks and a reference conv."""
    return (cfg.in_dim, cfg.out_dim, tuple(cfg.patch_size), cfg.freq_dim, cfg.text_dim, cfg.image_dim,
            cfg.image_pos_tokens, bool(cfg.vace_layers), cfg.vace_in_dim if cfg.vace_layers else None,
            cfg.ref_conv_in)


def task_type_model(identity: Identity, registry: Registry) -> str | None:
    """The registry model whose task type a DiT of another size (a finetune, a resized model) has:
    it lends the job its VAE, text encoder, tokenizer and defaults. A single network is preferred to
    an A14B expert; None when no model has the task type."""
    if identity.kind != "dit" or identity.dit is None:
        return None
    key = _task_key(identity.dit)
    fitting = [spec for spec in registry.list() if _task_key(_spec_config(spec)) == key]
    single = [spec for spec in fitting if not spec.is_two_expert]
    return (single or fitting)[0].id if fitting else None


def size_notice(config: DiTConfig, spec: ModelSpec) -> str | None:
    """The notice a job gets when its DiT (a given file) is not the size of the model it runs as."""
    expected = _spec_config(spec)
    if _arch_key(config) == _arch_key(expected):
        return None
    return (f"this DiT (dim {config.dim}, {config.num_layers} layers) is not a registry model's: it runs with the "
            f"defaults of {spec.id}'s task type (dim {expected.dim}, {expected.num_layers} layers there)")


def registry_notice(identity: Identity, matches: list[Match]) -> str | None:
    """The notice a DiT that fits no registry model gets (None when it fits one, or is no DiT)."""
    if identity.kind != "dit" or matches:
        return None
    return (f"this Wan DiT ({identity.variant}, dim {identity.dim}, {identity.num_layers} layers) matches no model "
            f"of the registry: it runs with the defaults of its task type ({identity.variant})")


def _spec_config(spec: ModelSpec) -> DiTConfig:
    return DiTConfig(**spec.dit_config())


__all__ = ["Identity", "KINDS", "Match", "classify_dit", "identify", "identify_checkpoint", "registry_matches",
           "registry_notice", "size_label", "size_notice", "task_type_model"]
