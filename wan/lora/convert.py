"""Writing a :class:`~wan.lora.formats.LoraFile` in the musubi, ComfyUI or diffusers key layout.

musubi and ComfyUI layouts carry the same tensors under other names, so converting between them
is lossless (tensors and alphas are written as read). The diffusers/PEFT layout has no alpha key:
the alpha/rank scale is folded into ``lora_A`` there, and only plain LoRA adapters fit it.
"""

from __future__ import annotations

import os

import torch

from wan.loading.keymaps import DIT_DIFFUSERS
from wan.lora.formats import LoraFile

# field -> tensor suffix, per layout (LyCORIS names are shared by musubi and ComfyUI).
_LYCORIS = {
    "loha": {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b"},
    "lokr": {"w1": "lokr_w1", "w2": "lokr_w2", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b",
             "w2a": "lokr_w2_a", "w2b": "lokr_w2_b"},
}
_COMMON = {"diff": "diff", "diff_b": "diff_b", "dora_scale": "dora_scale"}
MUSUBI_SUFFIXES = {"down": "lora_down.weight", "up": "lora_up.weight"}
COMFY_SUFFIXES = {"down": "lora_A.weight", "up": "lora_B.weight"}


def musubi_name(official: str) -> str:
    """``blocks.0.self_attn.q`` -> ``lora_unet_blocks_0_self_attn_q``."""
    return "lora_unet_" + official.replace(".", "_")


def comfy_name(official: str) -> str:
    """``blocks.0.self_attn.q`` -> ``diffusion_model.blocks.0.self_attn.q``."""
    return "diffusion_model." + official


def _write(lora: LoraFile, module_name, lora_suffixes: dict[str, str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, w in lora.targets.items():
        base = module_name(name)
        table = {**(lora_suffixes if w.kind == "lora" else _LYCORIS.get(w.kind, {})), **_COMMON}
        for fld, suffix in table.items():
            t = getattr(w, fld)
            if t is not None:
                out[f"{base}.{suffix}"] = t
        if w.alpha is not None:
            out[f"{base}.alpha"] = torch.tensor(w.alpha, dtype=w.alpha_dtype)
    return out


def to_musubi(lora: LoraFile) -> dict[str, torch.Tensor]:
    """State dict in musubi-tuner / kohya layout (``lora_unet_*.lora_down.weight``, ``.alpha``)."""
    return _write(lora, musubi_name, MUSUBI_SUFFIXES)


def to_comfy(lora: LoraFile) -> dict[str, torch.Tensor]:
    """State dict in the ComfyUI / original layout (``diffusion_model.*.lora_A.weight``, ``.alpha``)."""
    return _write(lora, comfy_name, COMFY_SUFFIXES)


def to_diffusers(lora: LoraFile) -> dict[str, torch.Tensor]:
    """State dict in the diffusers/PEFT layout (``transformer.blocks.0.attn1.to_q.lora_A.weight``).

    The alpha/rank scale is folded into ``lora_A`` (diffusers has no alpha key), so the result is
    equal in effect, not bit for bit. Raises ValueError for adapters the layout cannot express.
    """
    out: dict[str, torch.Tensor] = {}
    for name, w in lora.targets.items():
        if w.kind != "lora" or w.diff is not None or w.diff_b is not None or w.dora_scale is not None:
            raise ValueError(f"LoRA {lora.path}: {name} is a {w.kind} adapter"
                             f"{' with diff/diff_b/DoRA tensors' if w.kind == 'lora' else ''}; the diffusers "
                             "layout only holds plain lora_A/lora_B (keep the musubi or ComfyUI layout)")
        base = "transformer." + DIT_DIFFUSERS.from_official(name)
        scale = w.scale()
        down = w.down if scale == 1.0 else (w.down.float() * scale).to(w.down.dtype)
        out[f"{base}.lora_A.weight"], out[f"{base}.lora_B.weight"] = down, w.up
    return out


def save_lora(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Writes a LoRA state dict as .safetensors; metadata values are stored as strings."""
    from safetensors.torch import save_file

    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.contiguous()
        # safetensors refuses tensors sharing memory (e.g. one alpha object reused); copy those
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    save_file(out, str(path), metadata=meta)

