"""Model specs as data: every Wan model this project knows, read from YAML files.

The built-in specs live in ``wan/registry/models/*.yaml``. Users add or replace models by dropping
their own YAML files in ``finetunes/`` at the repository root (or any folder passed as
``load_registry(extra_dirs=[...])``). A later folder overrides an earlier one by model id; a spec
may start from another with ``inherit: <id>`` (its own id means "the definition I replace"), so a
finetune is a few lines::

    models:
      my-wan-finetune:
        inherit: wan2.1-t2v-14B
        display_name: My finetune
        files:
          transformer:
            variants:
              bf16: {repo: me/my-finetune, file: my_finetune_bf16.safetensors}

A YAML file holds up to four top-level keys: ``family`` (the default family of its models),
``components`` (shared file tables, e.g. the VAE, referenced by name from a model's ``files``),
``models`` (id -> spec) and ``loras`` (id -> a public LoRA: its file(s), the models it fits and
the accelerator recipe it belongs to; see ``models/accelerators.yaml``). Keys starting with ``x-`` are ignored: they hold YAML anchors. Unknown keys,
wrong types and inconsistent values are errors naming the file, the key, the value and what is
allowed (:mod:`wan.config`). A ``source: generated`` file may only name one of the project's test
generators (``specs.GENERATORS``): a spec from a user never makes the app run code of its choosing.

Lookup: ``get_model(id)``, ``list_models()``, ``families()`` use the built-ins plus ``finetunes/``,
loaded once on first use; ``load_registry()`` builds a fresh ``Registry`` object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from wan.registry.parse import _component, _lora_entry, _model, _read_folder, _resolve_inheritance
from wan.registry.specs import (BUILTIN_DIR, EXPERTS, MODEL_TYPES, REPO_ROOT, SAMPLERS, TASKS, USER_DIR,  # noqa: F401
                                VAE_SHAPES, VARIANT_FALLBACK, VARIANTS, Arch, Component, Defaults, FileSource,
                                LoraEntry, ModelSpec, Registry, RegistryError, UnknownModelError, VaeSpec)

# ----------------------------------------------------------------------------- public lookup

_default: Registry | None = None


def default_registry(reload: bool = False) -> Registry:
    """The built-in specs plus ``finetunes/`` at the repo root, read once (``reload`` re-reads)."""
    global _default
    if _default is None or reload:
        _default = load_registry([USER_DIR] if USER_DIR.is_dir() else [])
    return _default


def get_model(model_id: str, registry: Registry | None = None) -> ModelSpec:
    return (registry or default_registry()).get(model_id)


def list_models(include_test: bool = True, registry: Registry | None = None) -> list[ModelSpec]:
    return (registry or default_registry()).list(include_test)


def families(registry: Registry | None = None) -> list[str]:
    return (registry or default_registry()).families()


def load_registry(extra_dirs: Iterable[str | Path] = (), include_builtin: bool = True) -> Registry:
    """Reads the built-in spec files, then each folder of ``extra_dirs`` in order; a later folder
    replaces models and components of an earlier one by id."""
    dirs = ([BUILTIN_DIR] if include_builtin else []) + [Path(d) for d in extra_dirs]
    models: dict[str, tuple[dict, str]] = {}
    components: dict[str, tuple[Any, str]] = {}
    loras: dict[str, tuple[Any, str]] = {}
    for folder in dirs:
        if not folder.is_dir():
            raise RegistryError(f"spec folder {folder}: no such folder")
        layer_models, layer_components = _read_folder(folder, loras)
        models.update(_resolve_inheritance(layer_models, models))
        components.update(layer_components)
    shared = {name: _component(name, raw, file, f"components.{name}")
              for name, (raw, file) in components.items()}
    specs = {mid: _model(mid, raw, file, shared) for mid, (raw, file) in models.items()}
    return Registry(specs, {lid: _lora_entry(lid, raw, file, specs) for lid, (raw, file) in loras.items()})


__all__ = [
    "Arch", "Component", "Defaults", "FileSource", "LoraEntry", "ModelSpec", "Registry", "RegistryError",
    "UnknownModelError", "VaeSpec", "TASKS", "VARIANTS", "VARIANT_FALLBACK", "default_registry",
    "families", "get_model", "list_models", "load_registry",
]
