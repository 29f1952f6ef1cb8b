"""The typed model specs (frozen dataclasses) and the constants and types their validation uses."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from wan.config import ConfigError, choice, did_you_mean, integer, is_int, is_number, items, number, rule, section

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
# The functions a `source: generated` file may name. A spec can come from a user's finetunes/ folder:
# it must not make the app import and run any function it likes (os.system, say).
GENERATORS = ("wan.testing.tiny_family.ensure_tiny_checkpoints",)


class RegistryError(ConfigError):
    """A spec file is malformed, or a model id is unknown. The message names file and key."""

    @classmethod
    def show(cls, key: str, value: Any) -> str:
        return f"{super().show(key, value)} ({type(value).__name__})"

    @classmethod
    def unknown(cls, where: str, key: str, name: Any, known: Any) -> "RegistryError":
        return cls(f"{cls.at(where, key)}: unknown key {name!r}{did_you_mean(name, known)}; "
                   f"allowed keys: {', '.join(known)}")


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
        generator: dotted name of a function ``f(checkpoint_dir)`` writing generated files (one
            of ``GENERATORS``).
        note: free text (e.g. how the dtype was inferred).
        local: an absolute path on this machine (a spec's ``path:``): used as it is when it exists;
            with no ``repo``, nothing is downloaded and a missing path is reported as missing.
    """

    variant: str
    repo: str | None
    files: tuple[str, ...]
    open_path: str
    sizes: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    verified: bool = True
    generator: str | None = None
    note: str = ""
    local: str | None = None

    @property
    def generated(self) -> bool:
        return self.generator is not None

    @property
    def uses_local(self) -> bool:
        """The local ``path:`` serves this variant: it exists, or there is no repo to fetch from."""
        return self.local is not None and (self.repo is None or os.path.exists(self.local))


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


# The value types of the spec sections that are read as they are written (Arch, VaeSpec).
Count = integer(1)
Index = integer(0)
Positive = number(0.0, open=True)


def _version(v: Any) -> Any:
    # YAML reads an unquoted 2.1 as a float; accept it and spell it as a string.
    return str(v) if is_number(v) else v


Version = rule("one of " + ", ".join(VAE_SHAPES), lambda v: _version(v) in VAE_SHAPES, _version)
Triple = rule("3 integers >= 1 (t, h, w)", lambda v: isinstance(v, list) and len(v) == 3
              and all(is_int(x) and x >= 1 for x in v), tuple)
FrozenMapping = rule("a mapping", lambda v: isinstance(v, dict), lambda v: MappingProxyType(dict(v)))


@section
class Arch:
    """DiT hyperparameters (wan-architecture.md §1.1), the ``arch:`` of a spec as written; the
    rules between them are checked with the rest of the model. head_dim is dim // num_heads."""

    dim: Count
    ffn_dim: Count
    num_heads: Count
    num_layers: Count
    in_dim: Count
    out_dim: Count
    model_type: choice(MODEL_TYPES)
    text_dim: Count = 4096
    freq_dim: Count = 256
    text_len: Count = 512
    patch_size: Triple = (1, 2, 2)
    eps: Positive = 1e-6
    vace_layers: items(Index) | None = None
    vace_in_dim: Count | None = None
    experts: items(choice(EXPERTS)) = ()
    extras: FrozenMapping = field(default_factory=lambda: MappingProxyType({}))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@section
class VaeSpec:
    """The ``vae:`` of a spec as written; it must match the shape of its version."""

    version: Version
    stride: items(Count)
    z_dim: Count


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

    def dit_config(self) -> dict[str, Any]:
        """Keyword arguments of ``wan.models.dit.DiTConfig`` for this model, the one conversion from
        a spec to a network (plain data: the registry imports no torch).

        Beyond the ``arch:`` table: the CLIP feature width and tokens per image when the model takes
        CLIP features (ViT-H: 1280 and 257, unless ``arch.extras`` gives ``image_dim`` /
        ``image_tokens``), flf2v's two images of positions, and the Fun V1.1 reference conv.
        """
        a = self.arch
        kwargs: dict[str, Any] = dict(
            dim=a.dim, ffn_dim=a.ffn_dim, num_heads=a.num_heads, num_layers=a.num_layers, in_dim=a.in_dim,
            out_dim=a.out_dim, patch_size=tuple(a.patch_size), freq_dim=a.freq_dim, text_dim=a.text_dim,
            text_len=a.text_len, eps=a.eps)
        if self.needs_clip:
            kwargs["image_dim"] = int(a.extras.get("image_dim", 1280))
            if a.model_type == "flf2v":
                kwargs["image_pos_tokens"] = 2 * int(a.extras.get("image_tokens", 257))
        if a.extras.get("ref_conv"):
            kwargs["ref_conv_in"] = int(a.extras.get("in_dim_ref_conv", 16))
        if a.vace_layers:
            kwargs["vace_layers"] = tuple(a.vace_layers)
            kwargs["vace_in_dim"] = a.vace_in_dim or 96
        return kwargs

    def __hash__(self) -> int:  # the mapping fields are unhashable; the id identifies a spec
        return hash((self.id, self.source_file))


# What the roles of a LoRA entry's files are: one file for a model of one network, a pair for the
# two experts of Wan 2.2 A14B.
LORA_ROLES = ("transformer", "high_noise", "low_noise")
# Key layouts of published LoRA files, named after who writes them (see the ``loras:`` section of
# wan/registry/models/accelerators.yaml and tests/test_guidance_phases.py, which rebuilds them).
LORA_LAYOUTS = ("lightx2v", "lightning", "kijai")


@dataclass(frozen=True)
class LoraEntry:
    """A public LoRA the registry knows, e.g. a step-distillation ("accelerator") LoRA.

    Attributes:
        id: the entry's id.
        accelerator: the recipe it belongs to; a profile's ``sampling.accelerator`` names it, and
            the entry whose ``fits`` holds the job's model is the one added to the job.
        fits: the model ids it is made for.
        files: role -> where it comes from (``transformer``, or ``high_noise`` and ``low_noise``).
        rank: its LoRA rank, as published.
        layout: the key layout of the published file (one of ``LORA_LAYOUTS``).
        source: the authors' page (and recipe) it was taken from.
    """

    id: str
    display_name: str
    accelerator: str
    fits: tuple[str, ...]
    files: Mapping[str, FileSource]
    rank: int
    layout: str
    source: str
    description: str = ""
    dtype: str = "bf16"
    source_file: str = ""

    def lora_name(self, role: str, family: str) -> str:
        """Where the file of ``role`` goes in the LoRA folder (a name inside it):
        ``<family folder>/accelerators/<id>[-<role>].safetensors``."""
        suffix = "" if role == "transformer" else f"-{role}"
        return f"{family}/accelerators/{self.id}{suffix}.safetensors"

    def __hash__(self) -> int:
        return hash((self.id, self.source_file))


class Registry:
    """Models by id (ids compare case-insensitively on lookup), and the LoRAs the registry knows."""

    def __init__(self, models: Mapping[str, ModelSpec], loras: Mapping[str, LoraEntry] | None = None):
        self._models = dict(models)
        self.loras: dict[str, LoraEntry] = dict(loras or {})

    def accelerator(self, name: str, model_id: str) -> LoraEntry | None:
        """The LoRA entry of recipe ``name`` made for model ``model_id``, or None."""
        return next((e for e in self.loras.values() if e.accelerator == name and model_id in e.fits), None)

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
