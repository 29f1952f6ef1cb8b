"""LoRA files of every common layout, read into one representation keyed by official DiT names.

A LoRA file is a flat dict of tensors whose keys are ``<prefix><module><sep>.<suffix>``:

* musubi-tuner / kohya: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` (module path with dots
  turned into underscores, so it is matched against the known official module list);
* ComfyUI / original Wan names: ``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` (prefix
  optional, also ``model.diffusion_model.``);
* diffusers / PEFT: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (+ ``.default.`` variants),
  renamed with :data:`wan.loading.keymaps.DIT_DIFFUSERS`;
* LyCORIS LoHa (``hada_w1_a`` ...) and LoKr (``lokr_w1`` ...) under the musubi or ComfyUI names;
* full deltas ``.diff`` / bias deltas ``.diff_b`` (distillation LoRAs) and DoRA magnitudes.

Everything about names lives in three tables below (:data:`OFFICIAL_MODULES`, :data:`PREFIXES`,
:data:`SUFFIXES`); the reader only walks them.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from wan.loading.files import CheckpointError, open_checkpoint
from wan.loading.keymaps import DIT_DIFFUSERS

# ---------------------------------------------------------------------------------------------
# Name tables

# Every module (or bare parameter) of the official WanDiT that a LoRA may target; ``#`` is a block
# index. Norms, convs and modulations appear because distillation LoRAs carry ``.diff`` for them.
_BLOCK_MODULES = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "self_attn.norm_q", "self_attn.norm_k",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.norm_q",
    "cross_attn.norm_k", "cross_attn.k_img", "cross_attn.v_img", "cross_attn.norm_k_img",
    "norm3", "ffn.0", "ffn.2", "modulation",
)
OFFICIAL_MODULES: tuple[str, ...] = (
    *(f"blocks.#.{m}" for m in _BLOCK_MODULES),
    *(f"vace_blocks.#.{m}" for m in (*_BLOCK_MODULES, "before_proj", "after_proj")),
    "patch_embedding", "vace_patch_embedding", "ref_conv",
    "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
    "head.head", "head.modulation",
    "img_emb.proj.0", "img_emb.proj.1", "img_emb.proj.3", "img_emb.proj.4", "img_emb.emb_pos",
)

# Key prefix -> (naming, how the rest of the key is turned into an official module name).
# Order matters: the longest prefix that fits wins, and "" is the fallback (bare official names).
PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "musubi"),
    ("model.diffusion_model.", "comfy"),
    ("diffusion_model.", "comfy"),
    ("transformer.", "diffusers"),
    ("base_model.model.", "diffusers"),  # raw PEFT adapter files
    ("", "comfy"),
)

# Tensor suffix (after the module name) -> (LoraWeights field, adapter kind it implies or None).
SUFFIXES: dict[str, tuple[str, str | None]] = {
    "lora_down.weight": ("down", "lora"), "lora_up.weight": ("up", "lora"),
    "lora.down.weight": ("down", "lora"), "lora.up.weight": ("up", "lora"),
    "lora_A.weight": ("down", "lora"), "lora_B.weight": ("up", "lora"),
    "lora_A.default.weight": ("down", "lora"), "lora_B.default.weight": ("up", "lora"),
    "alpha": ("alpha", None),
    "hada_w1_a": ("w1a", "loha"), "hada_w1_b": ("w1b", "loha"),
    "hada_w2_a": ("w2a", "loha"), "hada_w2_b": ("w2b", "loha"),
    "lokr_w1": ("w1", "lokr"), "lokr_w2": ("w2", "lokr"),
    "lokr_w1_a": ("w1a", "lokr"), "lokr_w1_b": ("w1b", "lokr"),
    "lokr_w2_a": ("w2a", "lokr"), "lokr_w2_b": ("w2b", "lokr"),
    "diff": ("diff", None), "diff_b": ("diff_b", None),
    "dora_scale": ("dora_scale", None),
    "lora_magnitude_vector": ("dora_scale", None),
    "lora_magnitude_vector.default.weight": ("dora_scale", None),
    "lora_magnitude_vector.weight": ("dora_scale", None),
}
# Longest first, so "lora_A.default.weight" is tried before "weight"-like shorter endings.
_SUFFIX_ORDER = sorted(SUFFIXES, key=len, reverse=True)


@lru_cache(maxsize=1)
def _module_patterns() -> tuple[list[tuple[re.Pattern, str]], list[tuple[re.Pattern, str]]]:
    """(dotted, underscored) full-match patterns for each official template."""
    dotted, underscored = [], []
    for t in OFFICIAL_MODULES:
        esc = re.escape(t).replace(r"\#", r"(\d+)")
        dotted.append((re.compile(esc + "$"), t))
        underscored.append((re.compile(re.escape(t.replace(".", "_")).replace(r"\#", r"(\d+)") + "$"), t))
    return dotted, underscored


def _match(path: str, patterns) -> str | None:
    for pattern, template in patterns:
        m = pattern.match(path)
        if m:
            groups = iter(m.groups())
            return re.sub("#", lambda _, it=groups: next(it), template)
    return None


def official_module(path: str, naming: str) -> tuple[str | None, str]:
    """Maps a module path (prefix removed) to (official name or None, naming it was read in).

    Underscored musubi names are ambiguous (``self_attn_q`` vs ``self_attn.q``), so they are only
    accepted when they spell one of the known official modules exactly.
    """
    dotted, underscored = _module_patterns()
    if naming == "musubi":
        return _match(path, underscored), "musubi"
    name = _match(path, dotted)
    if name is not None:
        return name, naming
    # diffusers names, with or without the "transformer." prefix
    name = _match(DIT_DIFFUSERS.to_official(path), dotted)
    return name, "diffusers"


def split_key(key: str) -> tuple[str, str, str] | None:
    """``key`` -> (prefix naming, module path, suffix), or None when the suffix is unknown."""
    suffix = next((s for s in _SUFFIX_ORDER if key.endswith("." + s)), None)
    if suffix is None:
        return None
    path = key[: -len(suffix) - 1]
    for prefix, naming in PREFIXES:
        if path.startswith(prefix):
            return naming, path[len(prefix):], suffix
    return None  # unreachable: "" always matches


# ---------------------------------------------------------------------------------------------
# Representation


@dataclass
class LoraWeights:
    """The adapter of one target module, e.g. ``blocks.0.self_attn.q``.

    kind:
        ``lora``: ``delta = up [out, r] @ down [r, in] * (alpha / r if alpha else 1)``.
        ``loha``: ``delta = (w1a @ w1b) * (w2a @ w2b) * (alpha / r if alpha else 1)``, r = w1b rows.
        ``lokr``: ``delta = kron(w1 or w1a @ w1b, w2 or w2a @ w2b) * scale``; scale = alpha / r where
            r is the rank of the first factor given as a product (w1b, else w2b), 1 when both are
            full matrices or alpha is absent.
        ``full``: only ``diff`` (full weight delta) and/or ``diff_b`` (bias delta [out]).
    Any kind may also carry ``diff``/``diff_b``; ``dora_scale`` ([out] or [out, 1]) is the DoRA
    magnitude, applied by whoever merges the delta (not in :meth:`delta`).
    """

    kind: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    w1: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    alpha_dtype: torch.dtype = torch.float32  # dtype the alpha was stored in, so converters keep it

    def rank(self) -> int | None:
        if self.kind == "lora":
            return self.down.shape[0]
        if self.kind == "loha":
            return self.w1b.shape[0]
        if self.kind == "lokr":
            for b in (self.w1b, self.w2b):
                if b is not None:
                    return b.shape[0]
        return None

    def scale(self) -> float:
        """The alpha/rank factor folded into :meth:`delta` (1 without alpha or rank)."""
        r = self.rank()
        return self.alpha / r if (self.alpha is not None and r) else 1.0

    def _lokr_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.w1.float() if self.w1 is not None else self.w1a.float() @ self.w1b.float()
        w2 = self.w2.float() if self.w2 is not None else _flat(self.w2a) @ _flat(self.w2b)
        return w1, w2

    def weight_shape(self) -> tuple[int, ...] | None:
        """The shape of the weight this adapter targets, as far as its tensors tell ([out, in])."""
        if self.kind == "lora":
            return (self.up.shape[0], _flat(self.down).shape[1])
        if self.kind == "loha":
            return (self.w1a.shape[0], self.w1b.shape[1])
        if self.kind == "lokr":
            w1, w2 = self._lokr_factors()
            return (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
        if self.diff is not None:
            return tuple(self.diff.shape)
        return None  # bias delta only

    def delta(self, weight_shape) -> torch.Tensor:
        """The weight delta in float32, shaped ``weight_shape``, alpha/rank folded in, DoRA not applied."""
        weight_shape = tuple(weight_shape)
        s = self.scale()
        if self.kind == "lora":
            d = (_flat(self.up) @ _flat(self.down)) * s
        elif self.kind == "loha":
            d = (self.w1a.float() @ self.w1b.float()) * (self.w2a.float() @ self.w2b.float()) * s
        elif self.kind == "lokr":
            d = torch.kron(*self._lokr_factors()) * s
        else:
            d = torch.zeros(weight_shape)
        if self.diff is not None:
            diff = self.diff.float().reshape(-1)
            d = diff if self.kind == "full" else d.reshape(-1) + diff
        if d.numel() != _numel(weight_shape):
            raise ValueError(f"LoRA delta of {d.numel()} values cannot take weight shape {weight_shape}")
        return d.reshape(weight_shape)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[a, b, *k] -> [a, b*prod(k)] in float32 (conv LoRA factors become matrices)."""
    return t.float().flatten(1) if t.dim() > 2 else t.float()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class LoraFile:
    """One LoRA file read into official module names.

    format: ``musubi`` | ``comfy`` | ``diffusers`` (the naming most keys use) or ``lycoris`` when
    it holds LoHa/LoKr adapters (``naming`` then tells musubi/comfy).
    dropped: ``"<key>: <reason>"`` for each key that was not used.
    """

    path: str
    format: str
    targets: dict[str, LoraWeights]
    metadata: dict = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    naming: str = ""


# ---------------------------------------------------------------------------------------------
# Reading


def load_lora(path: str | os.PathLike) -> LoraFile:
    """Reads a LoRA file (.safetensors or .pth) of any supported layout.

    Raises:
        CheckpointError: the file is missing, truncated or corrupted (the message names it).
        ValueError: the file holds no recognised LoRA key ("not a LoRA").
    """
    ckpt = open_checkpoint(path)
    state = {}
    names = ckpt.keys()
    for key in names:
        try:
            state[key] = ckpt.tensor(key)
        except CheckpointError:
            raise
        except (OSError, RuntimeError, ValueError) as e:  # failing mid-file: corrupted, say which
            raise CheckpointError(f"LoRA {path}: tensor {key} cannot be read ({e})") from None
    lora = parse_lora_state(state, str(path))
    lora.metadata = dict(ckpt.metadata or {})
    return lora


def parse_lora_state(state: dict[str, torch.Tensor], path: str = "<state dict>") -> LoraFile:
    """Groups the tensors of a LoRA state dict by official module name (see :func:`load_lora`)."""
    fields: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, set[str]] = {}
    keys_of: dict[str, list[str]] = {}
    namings: Counter = Counter()
    dropped: list[str] = []
    for key, tensor in state.items():
        parts = split_key(key)
        if parts is None:
            dropped.append(f"{key}: not a LoRA tensor name")
            continue
        naming, module_path, suffix = parts
        name, naming = official_module(module_path, naming)
        if name is None:
            dropped.append(f"{key}: module '{module_path}' is not part of the Wan DiT")
            continue
        field_name, kind = SUFFIXES[suffix]
        slot = fields.setdefault(name, {})
        if field_name in slot:
            dropped.append(f"{key}: duplicate '{field_name}' for {name}")
            continue
        slot[field_name] = tensor
        keys_of.setdefault(name, []).append(key)
        if kind:
            kinds.setdefault(name, set()).add(kind)
        namings[naming] += 1

    targets: dict[str, LoraWeights] = {}
    for name, slot in fields.items():
        w, why = _build(slot, kinds.get(name, set()))
        if w is None:
            dropped.extend(f"{k}: {why}" for k in keys_of[name])
        else:
            targets[name] = w
    if not targets:
        shown = ", ".join(list(state)[:3]) or "no tensors"
        raise ValueError(f"LoRA {path}: not a LoRA: no recognised LoRA key for the Wan DiT (first keys: {shown})")
    naming = namings.most_common(1)[0][0]
    lycoris = any(w.kind in ("loha", "lokr") for w in targets.values())
    return LoraFile(path=path, format="lycoris" if lycoris else naming, targets=targets,
                    dropped=dropped, naming=naming)


_REQUIRED = {"lora": ("down", "up"), "loha": ("w1a", "w1b", "w2a", "w2b")}


def _build(slot: dict[str, torch.Tensor], kinds: set[str]) -> tuple[LoraWeights | None, str]:
    """One module's tensors -> LoraWeights, or (None, reason) when they do not form an adapter."""
    if len(kinds) > 1:
        return None, f"mixes adapter kinds {sorted(kinds)}"
    kind = next(iter(kinds)) if kinds else "full"
    missing = [f for f in _REQUIRED.get(kind, ()) if f not in slot]
    if kind == "lokr":
        missing = [f"{w}|{w}a,{w}b" for w in ("w1", "w2")
                   if w not in slot and not (f"{w}a" in slot and f"{w}b" in slot)]
    if kind == "full" and "diff" not in slot and "diff_b" not in slot:
        return None, "an alpha or DoRA scale without any adapter tensor"
    if missing:
        return None, f"incomplete {kind} adapter (missing {', '.join(missing)})"
    alpha_t = slot.pop("alpha", None)
    w = LoraWeights(kind=kind, **slot)
    if alpha_t is not None:
        if alpha_t.numel() != 1:
            return None, f"alpha has shape {tuple(alpha_t.shape)}, expected a scalar"
        w.alpha, w.alpha_dtype = float(alpha_t.float().reshape(())), alpha_t.dtype
    if kind == "lora" and w.down.shape[0] != w.up.shape[1]:
        return None, f"rank mismatch: down {tuple(w.down.shape)} vs up {tuple(w.up.shape)}"
    return w, ""
