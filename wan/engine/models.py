"""Keeps the networks of the selected model loaded between requests.

One model set (DiT or experts, VAE, text encoder, CLIP) is held at a time; choosing another model
releases the previous set first, so two large models never sit in memory together. Files come
from the checkpoints folder (downloaded on first use, or generated for the TEST family).
"""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

import wan
from wan.registry import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class ModelSet:
    """The loaded networks of one model.

    ``dits`` maps the loop's expert names ("transformer", or "high_noise" / "low_noise") to DiTs.
    """

    spec: ModelSpec
    dits: dict
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    clip: torch.nn.Module | None = None
    paths: dict = field(default_factory=dict)

    @property
    def dit(self):
        """The DiT whose configuration describes the model (any expert: they share it)."""
        return next(iter(self.dits.values()))


class ModelManager:
    """Loads model sets on demand and keeps the last one.

    Args:
        checkpoint_dir: where model files live (``<dir>/<owner>/<repo>/...``, see wan.loading.download).
        device: where the networks run.
        dtype: weights dtype of the DiT; None picks bfloat16 on CUDA and float32 on CPU.
        variant: which weights to fetch (bf16, fp16, fp8_scaled ...); TEST models always use fp32.
    """

    def __init__(self, checkpoint_dir: str | Path = "checkpoints", device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, variant: str = "bf16"):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.variant = variant
        self._current: ModelSet | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> ModelSet | None:
        return self._current

    def get(self, spec: ModelSpec) -> ModelSet:
        """The loaded set of ``spec``, loading it (and releasing another) if needed."""
        with self._lock:
            if self._current is not None and self._current.spec.id == spec.id:
                return self._current
            self.release()
            self._current = self._load(spec)
            return self._current

    def release(self) -> None:
        """Drops the loaded set so its memory can be reused."""
        if self._current is not None:
            log.info("releasing model %s", self._current.spec.id)
        self._current = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _load(self, spec: ModelSpec) -> ModelSet:
        from wan.loading.download import ensure_files
        variant = "fp32" if spec.test_model else self.variant
        paths = ensure_files(spec, self.checkpoint_dir, variant=variant)
        log.info("loading model %s", spec.id)
        dits = {}
        for role in spec.transformer_roles:
            expert = role.removeprefix("transformer_") if role != "transformer" else role
            dits[expert] = wan.load_transformer(paths[role], device=self.device, dtype=self.dtype)
        te_dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        text_encoder = wan.load_text_encoder(paths["text_encoder"], device=self.device, dtype=te_dtype,
                                             tokenizer=paths.get("tokenizer"))
        vae = wan.load_vae(paths["vae"], device=self.device, dtype=torch.float32)
        clip = None
        if spec.needs_clip:
            clip = wan.load_clip(paths["clip"], device=self.device,
                                 dtype=torch.float32 if self.device.type == "cpu" else torch.float16)
        return ModelSet(spec, dits, vae, text_encoder, clip, dict(paths))
