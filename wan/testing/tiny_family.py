"""The TEST model family: tiny random Wan models written on first use, in the public layouts.

``ensure_tiny_checkpoints(checkpoint_dir)`` writes, under ``<checkpoint_dir>/tiny/``, every file
the ``test-tiny-*`` entries of the registry name (see ``wan/registry/models/test-tiny.yaml``):
DiTs in the official key layout (t2v, i2v with CLIP, flf2v, VACE, TI2V, Fun InP, Fun V1.1
Control with its reference conv, and a two-expert A14B-style pair), the Wan 2.1 and 2.2 VAEs, umT5 with its tokenizer, and CLIP vision. Weights are
drawn from fixed seeds, so every machine writes the same bytes; generation takes about a second.
The whole folder is written aside and renamed into place, so a crash or a concurrent writer never
leaves a half-written family.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from wan.testing.tiny_encoders import (TINY_CLIP, TINY_CLIP_TOKENS, TINY_T5, tiny_clip_state_dict,
                                       tiny_t5_state_dict, write_tiny_tokenizer)
from wan.testing.tiny_vae import tiny_vae_state_dict

# Bump when what is written changes: an existing folder of another version is rewritten.
FAMILY_VERSION = 3
TINY_DIT = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, freq_dim=256, text_dim=TINY_T5["dim"])
TINY_DIT_VARIANTS: dict[str, dict] = {
    "t2v": {},
    "i2v": dict(in_dim=36, image_dim=TINY_CLIP["dim"]),
    "flf2v": dict(in_dim=36, image_dim=TINY_CLIP["dim"], image_pos_tokens=2 * TINY_CLIP_TOKENS),
    "vace": dict(vace_layers=(0, 1)),
    "ti2v": dict(in_dim=48, out_dim=48),
    "fun_inp": dict(in_dim=36, image_dim=TINY_CLIP["dim"]),
    "fun_control": dict(in_dim=48, image_dim=TINY_CLIP["dim"], ref_conv_in=16),
    "i2v_a14b": dict(in_dim=36),  # Wan 2.2 i2v: image latents in y, no CLIP
}
# (file, variant, seed): each file of the family that holds a DiT.
_DIT_FILES = [
    *((f"{name}/transformer.safetensors", name, 100 + i) for i, name in enumerate(TINY_DIT_VARIANTS)
      if name != "i2v_a14b"),
    ("t2v_a14b/high_noise.safetensors", "t2v", 200),
    ("t2v_a14b/low_noise.safetensors", "t2v", 201),
    ("i2v_a14b/high_noise.safetensors", "i2v_a14b", 202),
    ("i2v_a14b/low_noise.safetensors", "i2v_a14b", 203),
]


def tiny_dit_state_dict(variant: str, seed: int) -> dict[str, torch.Tensor]:
    """Float32 weights of a tiny DiT ``variant``, official key names, deterministic in ``seed``.

    Matrices get std 1/sqrt(fan_in) so activations keep their scale; norm gains sit around 1 and
    modulations near 0 with some noise, so that no parameter is a constant a key-map bug could hide.
    """
    from wan.models.dit import DiTConfig, WanDiT
    cfg = DiTConfig(**TINY_DIT, **TINY_DIT_VARIANTS[variant])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        if "norm" in key and key.endswith(".weight"):
            out[key] = 1 + 0.1 * noise
        elif len(shape) >= 2 and "modulation" not in key and "emb_pos" not in key:
            fan_in = shape[1:].numel()
            out[key] = noise / fan_in ** 0.5
        else:  # biases, modulation, emb_pos
            out[key] = 0.05 * noise
    return out


_made_here: Path | None = None  # this process's own copy of the family, once made (see below)


def ensure_tiny_checkpoints(checkpoint_dir: str | os.PathLike, reuse: bool = True) -> Path:
    """Writes the tiny family under ``<checkpoint_dir>/tiny`` unless it is already there.

    The files are the same bytes every time (seeded), so a process makes them once, into a private
    folder of its own, and copies them to each later ``checkpoint_dir`` (a copy, so that a caller
    may change its files freely); ``reuse=False`` makes them afresh.

    Returns:
        the ``tiny`` folder.
    """
    root = Path(checkpoint_dir)
    final = root / "tiny"
    marker = final / "family.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == FAMILY_VERSION:
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        source = _process_copy() if reuse else None
        if source is not None:
            shutil.copytree(source, staging, dirs_exist_ok=True)
        else:
            _write_family(staging)
            (staging / "family.json").write_text(json.dumps({"version": FAMILY_VERSION, "test_model": True}))
        if final.exists():  # an older version: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(staging, final)
        except OSError:
            if not marker.exists():  # not another writer that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _process_copy() -> Path | None:
    """This process's private copy of the family, made on first use (removed when the process
    ends); None when it cannot be made (the caller then writes the family itself)."""
    global _made_here
    if _made_here is None or not (_made_here / "family.json").exists():
        import atexit
        folder = Path(tempfile.mkdtemp(prefix="wan-tiny-family-"))
        try:
            _write_family(folder)
            (folder / "family.json").write_text(json.dumps({"version": FAMILY_VERSION, "test_model": True}))
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
            return None
        atexit.register(shutil.rmtree, folder, True)
        _made_here = folder
    return _made_here


def _write_family(folder: Path) -> None:
    from safetensors.torch import save_file
    for rel, variant, seed in _DIT_FILES:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file(tiny_dit_state_dict(variant, seed), str(folder / rel))
    save_file(tiny_vae_state_dict("2.1", seed=300), str(folder / "vae_2.1.safetensors"))
    save_file(tiny_vae_state_dict("2.2", seed=301), str(folder / "vae_2.2.safetensors"))
    save_file(tiny_t5_state_dict(seed=400), str(folder / "umt5.safetensors"))
    save_file(tiny_clip_state_dict(seed=500), str(folder / "clip.safetensors"))
    write_tiny_tokenizer(folder / "tokenizer")
