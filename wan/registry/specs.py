"""The typed model specs (frozen dataclasses) and the constants their validation uses."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

BUILTIN_DIR = Path(__file__).parent / "models"
REPO_ROOT = Path(__file__).resolve().parents[2]
USER_DIR = REPO_ROOT / "finetunes"

TASKS = ("t2v", "t2i", "i2v", "flf2v", "v2v", "fun_inp", "fun_control", "vace", "ti2v")
MODEL_TYPES = ("t2v", "i2v", "flf2v", "ti2v", "vace")
SAMPLERS = ("unipc", "dpm++")
EXPERTS = ("high_noise", "low_noise")
# "any" is for files that have no dtype (tokenizers).
VARIANTS = ("fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_scaled", "any")
# What to try, in order, when a component lacks the requested variant. Same-size first, then
# larger (more faithful), then smaller.
VARIANT_FALLBACK = {
    "fp32": ("fp32", "bf16", "fp16", "fp8_scaled", "fp8_e4m3fn"),
    "bf16": ("bf16", "fp16", "fp32", "fp8_scaled", "fp8_e4m3fn"),
    "fp16": ("fp16", "bf16", "fp32", "fp8_scaled", "fp8_e4m3fn"),
    "fp8_scaled": ("fp8_scaled", "fp8_e4m3fn", "bf16", "fp16", "fp32"),
    "fp8_e4m3fn": ("fp8_e4m3fn", "fp8_scaled", "bf16", "fp16", "fp32"),
    "any": ("any",),
}
# VAE version -> (stride (t, h, w), latent channels).
VAE_SHAPES = {"2.1": ((4, 8, 8), 16), "2.2": ((4, 16, 16), 48)}
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_DOTTED_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$")


class RegistryError(ValueError):
    """A spec file is malformed, or a model id is unknown. The message names file and key."""


class UnknownModelError(RegistryError, KeyError):
    """No model has the requested id; the message lists the known ids."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


# ----------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class FileSource:
    """One variant of one component: where its files come from and what a loader opens.

    Attributes:
        variant: dtype label (``bf16``, ``fp8_scaled``, ... or ``any``).
        repo: Hugging Face repo id, or None for files generated locally.
        files: paths inside the repo (or under the checkpoint folder when generated), fetched in order.
        open_path: the path a loader is given: the file itself, the folder holding a shard index,
            or a tokenizer folder.
        sizes: known byte sizes, path -> bytes (a present file of another size is re-fetched).
        verified: False when the file name could not be confirmed from public sources.
        generator: dotted name of a function ``f(checkpoint_dir)`` writing generated files.
        note: free text (e.g. how the dtype was inferred).
    """

    variant: str
    repo: str | None
    files: tuple[str, ...]
    open_path: str
    sizes: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    verified: bool = True
    generator: str | None = None
    note: str = ""

    @property
    def generated(self) -> bool:
        return self.generator is not None


@dataclass(frozen=True)
class Component:
    """The variants of one component (a transformer, the VAE, ...), in file order."""

    name: str
    default: str
    variants: Mapping[str, FileSource]

    def choose(self, requested: str | None = None) -> FileSource:
        """The variant to use for ``requested``: itself, else the first of its fallback order that
        exists, else this component's default. ``None`` or ``"default"`` gives the default."""
        if requested in (None, "default"):
            return self.variants[self.default]
        if requested not in VARIANT_FALLBACK:
            raise RegistryError(
                f"unknown variant {requested!r}; known variants: {', '.join(VARIANT_FALLBACK)} "
                f"(or 'default')")
        for name in VARIANT_FALLBACK[requested]:
            if name in self.variants:
                return self.variants[name]
        return self.variants[self.default]


@dataclass(frozen=True)
class Arch:
    """DiT hyperparameters (wan-architecture.md §1.1). head_dim is dim // num_heads."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    model_type: str
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    vace_layers: tuple[int, ...] | None = None
    vace_in_dim: int | None = None
    experts: tuple[str, ...] = ()
    extras: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class VaeSpec:
    version: str
    stride: tuple[int, int, int]
    z_dim: int


@dataclass(frozen=True)
class Defaults:
    """Default sampling settings. ``guidance`` is the only scale, or the low-noise expert's one
    when ``guidance_high_noise`` is set; the high-noise expert runs while t >= boundary * 1000."""

    steps: int
    shift: float
    guidance: float
    fps: int
    frames: int
    sampler: str
    negative_prompt: Mapping[str, str]
    guidance_high_noise: float | None = None
    boundary: float | None = None
    shift_at_size: Mapping[tuple[int, int], float] = field(
        default_factory=lambda: MappingProxyType({}))

    def shift_for(self, size: tuple[int, int] | None) -> float:
        """The shift for an output (width, height): some sizes have their own (i2v at 480p)."""
        return self.shift_at_size.get(tuple(size), self.shift) if size else self.shift


@dataclass(frozen=True)
class ModelSpec:
    """Everything the app needs to know about one model, as plain data."""

    id: str
    display_name: str
    family: str
    version: str
    tasks: tuple[str, ...]
    arch: Arch
    vae: VaeSpec
    text_encoder: str
    needs_clip: bool
    defaults: Defaults
    sizes: tuple[tuple[int, int], ...]
    default_size: tuple[int, int]
    sizes_are_max_area: bool
    files: Mapping[str, Component]
    test_model: bool = False
    description: str = ""
    unconfirmed: tuple[str, ...] = ()
    source_file: str = ""

    @property
    def transformer_roles(self) -> tuple[str, ...]:
        """``("transformer",)``, or one role per expert, high-noise first."""
        if self.arch.experts:
            return tuple(f"transformer_{e}" for e in self.arch.experts)
        return ("transformer",)

    @property
    def is_two_expert(self) -> bool:
        return bool(self.arch.experts)

    def __hash__(self) -> int:  # the mapping fields are unhashable; the id identifies a spec
        return hash((self.id, self.source_file))


class Registry:
    """Models by id (ids compare case-insensitively on lookup)."""

    def __init__(self, models: Mapping[str, ModelSpec]):
        self._models = dict(models)

    def get(self, model_id: str) -> ModelSpec:
        if model_id in self._models:
            return self._models[model_id]
        folded = {k.lower(): k for k in self._models}
        if isinstance(model_id, str) and model_id.lower() in folded:
            return self._models[folded[model_id.lower()]]
        close = difflib.get_close_matches(str(model_id), list(self._models), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model id {model_id!r}.{hint} Known ids: {', '.join(sorted(self._models))}")

    def ids(self) -> list[str]:
        return list(self._models)

    def list(self, include_test: bool = True) -> list[ModelSpec]:
        """Real models first (in file order), then the TEST models."""
        models = sorted(self._models.values(), key=lambda m: m.test_model)
        return [m for m in models if include_test or not m.test_model]

    def families(self) -> list[str]:
        return sorted({m.family for m in self._models.values()})

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._models

    def __len__(self) -> int:
        return len(self._models)
