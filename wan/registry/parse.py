"""Reading spec YAML files into :mod:`wan.registry.specs` dataclasses.

The YAML's shape is the schema below (:mod:`wan.config` models), so errors name the file, the
dotted key, the value and what is allowed; rules between fields are validators of the section
holding them. The schema follows the files (``file`` or ``files``, guidance as one number or one
per expert, components by name), the dataclasses follow what the app reads.
"""

from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from pydantic import model_validator

from wan.config import (Bool, ConfigModel, Name, Text, choice, fail, is_number, items, merge, number, read_yaml,
                        reject, rule, validate)
from wan.registry.specs import (_REPO_RE, _SIZE_RE, EXPERTS, GENERATORS, LORA_LAYOUTS, LORA_ROLES, SAMPLERS, TASKS,
                                VAE_SHAPES, VARIANTS, Arch, LoraEntry,
                                Component, Count, Defaults, FileSource, ModelSpec, Positive, RegistryError, VaeSpec,
                                Version)

# ----------------------------------------------------------------------------- reading files


class _SpecFile(ConfigModel):
    """A spec file; its keys starting with ``x-`` are left out first (they hold YAML anchors)."""

    family: Name = None
    components: dict[str, Any] = {}
    models: dict[str, dict] = {}
    loras: dict[str, Any] = {}


def _read_folder(folder: Path, loras: dict | None = None) -> tuple[dict, dict]:
    """Raw models and components of every ``*.yaml``/``*.yml`` in a folder; an id defined twice
    in one folder is an error (which one wins would depend on file names). The raw ``loras:``
    entries are added to ``loras`` (id -> (raw, file)) when it is given."""
    models: dict[str, tuple[dict, str]] = {}
    components: dict[str, tuple[Any, str]] = {}
    seen_loras: dict[str, str] = {}
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        raw = read_yaml(path, RegistryError)
        data = validate(_SpecFile, {k: v for k, v in raw.items() if not str(k).startswith("x-")}, str(path),
                        RegistryError)
        for name, value in data.components.items():
            if name in components:
                raise RegistryError.say(str(path), f"components.{name}",
                                        f"component defined twice in this folder (also in {components[name][1]})")
            components[name] = (value, str(path))
        for mid, value in data.models.items():
            if mid in models:
                raise RegistryError.say(str(path), f"models.{mid}",
                                        f"model id defined twice in this folder (also in {models[mid][1]})")
            models[mid] = ({"family": data.family, **value} if data.family else value, str(path))
        for lid, value in data.loras.items():
            if lid in seen_loras:
                raise RegistryError.say(str(path), f"loras.{lid}",
                                        f"LoRA id defined twice in this folder (also in {seen_loras[lid]})")
            seen_loras[lid] = str(path)
            if loras is not None:
                loras[lid] = (value, str(path))
    return models, components


# Mappings a child spec replaces whole instead of merging into: a finetune's transformer must not
# keep the variants of the model it starts from, a t2i spec must not keep the t2v prompts.
_REPLACED_WHOLE = ("files.*", "defaults.negative_prompt", "defaults.shift_at_size", "defaults.guidance", "arch.extras")


def _resolve_inheritance(layer: dict, earlier: dict) -> dict:
    """Applies ``inherit:`` inside one folder. A parent is a model of this folder, or of the
    earlier folders (always so when a spec inherits its own id)."""
    done: dict[str, tuple[dict, str]] = {}

    def resolve(mid: str, chain: tuple[str, ...]) -> tuple[dict, str]:
        if mid in done:
            return done[mid]
        raw, file = layer[mid]
        parent, key = raw.get("inherit"), f"models.{mid}.inherit"
        if parent is None:
            done[mid] = (raw, file)
            return done[mid]
        if not isinstance(parent, str) or not parent:
            raise RegistryError.bad(file, key, parent, "a model id")
        if parent != mid and parent in layer:
            if parent in chain:
                raise RegistryError.say(file, key, f"inheritance cycle: {' -> '.join(chain + (parent,))}")
            base = resolve(parent, chain + (parent,))[0]
        elif parent in earlier:
            base = earlier[parent][0]
        else:
            known = ", ".join(sorted(set(layer) | set(earlier)))
            raise RegistryError.say(file, key, f"inherits unknown model {parent!r}; known ids: {known}")
        done[mid] = (merge(base, {k: v for k, v in raw.items() if k != "inherit"}, _REPLACED_WHOLE), file)
        return done[mid]

    for mid in layer:
        resolve(mid, (mid,))
    return done


# ----------------------------------------------------------------------------- value types


def _is_rel_path(v: Any) -> bool:
    """A path inside a repo or the checkpoint folder (specs may come from users)."""
    path = PurePosixPath(v) if isinstance(v, str) and v else None
    return path is not None and not path.is_absolute() and ".." not in path.parts and "\\" not in v


RelPath = rule("a relative path with '/' separators and no '..'", _is_rel_path, lambda v: str(PurePosixPath(v)))
RepoId = rule("a Hugging Face repo id 'owner/name'", lambda v: isinstance(v, str) and _REPO_RE.match(v))
Size = rule("a size written WIDTHxHEIGHT such as '832x480'", lambda v: isinstance(v, str) and _SIZE_RE.match(v),
            lambda v: tuple(int(x) for x in v.split("x")))
Variant = choice(VARIANTS)
LocalPath = rule("a path on this machine (absolute, '~/...', or relative to the spec file)",
                 lambda v: isinstance(v, str) and bool(v.strip()) and "\0" not in v)
_SHARD_INDEX = ".safetensors.index.json"

# ----------------------------------------------------------------------------- the schema


class _Source(ConfigModel):
    """One variant's files: ``file`` (with ``shards``, the index of standard HF shards), or
    ``files`` and the ``folder`` a loader opens; from a Hugging Face ``repo`` or a ``generator``.
    ``path`` names a file or folder on this machine (``~`` expanded, relative to the spec file):
    alone, it is the only source; beside ``repo``/``file``, it is used when it exists."""

    source: choice(("hf", "generated")) = "hf"
    repo: RepoId | None = None
    generator: choice(GENERATORS) | None = None
    file: RelPath | None = None
    shards: Count | None = None
    files: items(RelPath) | None = None
    folder: RelPath | None = None
    size: Count | None = None
    sizes: dict[str, Count] = {}
    verified: Bool = True
    note: Name = ""
    path: LocalPath | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "_Source":
        hf, needed = self.source == "hf", "repo" if self.source == "hf" else "generator"
        if self.path is not None:
            if not hf:
                fail("generated files have no local path", "path")
            if self.repo is None:
                if self.file is not None or self.files is not None or self.shards:
                    fail("with 'path' alone, the path is the file; 'file'/'files' go with 'repo'", "file")
                return self
        if getattr(self, needed) is None:
            fail("required key is missing" + (" (or give 'path', a file on this machine)" if hf else ""), needed)
        if hf and self.generator is not None:
            fail("only files with 'source: generated' have a generator", "generator")
        if not hf and self.repo is not None:
            fail("generated files come from no repo", "repo")
        if (self.file is None) == (self.files is None):
            fail("give exactly one of 'file' (one file) or 'files' (a list)")
        if self.file is not None and self.folder is not None:
            fail("'folder' goes with 'files'", "folder")
        if self.files is not None and self.shards:
            fail("'shards' goes with 'file' (the index json)", "shards")
        if self.files is not None and self.folder is None:
            fail("a list of files needs 'folder': the path a loader opens", "folder")
        if self.shards and not self.file.endswith(_SHARD_INDEX):
            fail(f"with 'shards', 'file' is the index and must end with {_SHARD_INDEX!r}", "file")
        if self.size is not None and len(self.paths) != 1:
            fail("'size' is for a single file; use 'sizes: {path: bytes}'", "size")
        for path in self.sizes:
            if path not in self.paths:
                fail(f"not one of this entry's files: {', '.join(self.paths)}", f"sizes.{path}")
        return self

    @property
    def paths(self) -> tuple[str, ...]:
        """The files fetched, in order: a shard index comes before its shards."""
        if self.files is not None:
            return self.files
        stem, n = self.file[: -len(_SHARD_INDEX)], self.shards or 0
        return (self.file, *(f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)))

    @property
    def open_path(self) -> str:
        """What a loader opens: the folder of a list of files or of a shard index, else the file."""
        if self.files is not None:
            return self.folder
        parent = str(PurePosixPath(self.file).parent)
        return self.file if not self.shards else "" if parent == "." else parent

    def build(self, variant: str, spec_dir: Path) -> FileSource:
        local = None if self.path is None else str((spec_dir / Path(self.path).expanduser()).resolve())
        if self.repo is None and local is not None:
            name = Path(local).name
            return FileSource(variant, None, (name,), name, verified=self.verified, note=self.note, local=local)
        sizes = {**({self.file: self.size} if self.size else {}), **self.sizes}
        return FileSource(variant, self.repo, self.paths, self.open_path, MappingProxyType(sizes), self.verified,
                          self.generator, self.note, local)


class _Component(ConfigModel):
    """The variants of one component; ``default`` is the first one unless named."""

    variants: dict[Variant, _Source]
    default: Variant | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "_Component":
        if not self.variants:
            fail("expected at least one variant", "variants")
        if self.default is not None and self.default not in self.variants:
            reject(self.default, "one of this component's variants: " + ", ".join(self.variants), "default")
        return self

    def build(self, name: str, spec_dir: Path) -> Component:
        variants = {v: source.build(v, spec_dir) for v, source in self.variants.items()}
        return Component(name, self.default or next(iter(variants)), MappingProxyType(variants))


class _Defaults(ConfigModel):
    """Sampling defaults; ``guidance`` is a number, or ``{low_noise, high_noise}`` for two experts."""

    steps: Count
    shift: Positive
    guidance: Any
    boundary: number(0.0, 1.0, open=True) | None = None
    fps: Count
    frames: Count
    sampler: choice(SAMPLERS)
    negative_prompt: dict[choice(TASKS), Text]
    shift_at_size: dict[Size, Positive] = {}

    def build(self) -> Defaults:
        low, high = ((self.guidance["low_noise"], self.guidance["high_noise"]) if isinstance(self.guidance, dict)
                     else (self.guidance, None))
        return Defaults(steps=self.steps, shift=self.shift, guidance=float(low), fps=self.fps, frames=self.frames,
                        sampler=self.sampler, negative_prompt=MappingProxyType(dict(self.negative_prompt)),
                        guidance_high_noise=None if high is None else float(high), boundary=self.boundary,
                        shift_at_size=MappingProxyType(dict(self.shift_at_size)))


class _Model(ConfigModel):
    """One model. ``files`` maps each role to a component table or a shared component's name."""

    display_name: Name
    description: Name = ""
    family: Name
    version: Version
    tasks: items(choice(TASKS))
    test_model: Bool = False
    arch: Arch
    vae: VaeSpec
    text_encoder: Name
    needs_clip: Bool
    defaults: _Defaults
    sizes: items(Size)
    default_size: Size | None = None
    sizes_are_max_area: Bool = False
    files: dict[str, Any]
    unconfirmed: items(Name) = ()

    @model_validator(mode="after")
    def _consistent(self) -> "_Model":
        arch, vae = self.arch, self.vae
        _check_arch(arch)
        _check_vae(vae)
        if arch.out_dim != vae.z_dim:
            fail(f"{arch.out_dim} differs from the VAE's {vae.z_dim} latent channels", "arch.out_dim")
        multiple = vae.stride[1] * arch.patch_size[1]
        for w, h in self.sizes:
            if w % multiple or h % multiple:
                fail(f"{w}x{h} is not a multiple of {multiple} (VAE stride x patch)", "sizes")
        if self.default_size is not None and self.default_size not in self.sizes:
            fail("{}x{} is not one of the sizes".format(*self.default_size), "default_size")
        _check_defaults(self.defaults, bool(arch.experts), self.tasks, vae.stride[0])
        return self

    @property
    def roles(self) -> tuple[str, ...]:
        transformers = tuple(f"transformer_{e}" for e in self.arch.experts) or ("transformer",)
        return transformers + ("vae", "text_encoder", "tokenizer") + (("clip",) if self.needs_clip else ())


# The rules between fields of a model's sections, checked by the model's validator (they name keys
# below the model).


def _check_arch(arch: Arch) -> None:
    if arch.dim % arch.num_heads:
        fail(f"dim {arch.dim} is not divisible by num_heads {arch.num_heads}", "arch.num_heads")
    if arch.model_type == "vace":
        for key in ("vace_layers", "vace_in_dim"):
            if getattr(arch, key) is None:
                fail("required key is missing (model_type 'vace')", f"arch.{key}")
        if max(arch.vace_layers) >= arch.num_layers:
            fail(f"layer {max(arch.vace_layers)} >= num_layers {arch.num_layers}", "arch.vace_layers")
    elif arch.vace_layers is not None or arch.vace_in_dim is not None:
        fail("only model_type 'vace' has VACE layers", "arch.vace_layers")
    if arch.experts and arch.experts != EXPERTS:
        reject(list(arch.experts), f"{list(EXPERTS)} (high-noise first)", "arch.experts")


def _check_vae(vae: VaeSpec) -> None:
    stride, z_dim = VAE_SHAPES[vae.version]
    if vae.stride != stride:
        reject(list(vae.stride), f"{list(stride)}, the stride of VAE {vae.version}", "vae.stride")
    if vae.z_dim != z_dim:
        reject(vae.z_dim, f"{z_dim}: VAE {vae.version} has {z_dim} latent channels", "vae.z_dim")


def _check_defaults(d: _Defaults, experts: bool, tasks: tuple[str, ...], t_stride: int) -> None:
    if experts:
        g = d.guidance
        if not (isinstance(g, dict) and set(g) == {"low_noise", "high_noise"}
                and all(is_number(x) and x > 0 for x in g.values())):
            reject(g, "{low_noise: x, high_noise: y} with numbers > 0 (a two-expert model)", "defaults.guidance")
        if d.boundary is None:
            fail("required key is missing (a two-expert model)", "defaults.boundary")
    elif not (is_number(d.guidance) and d.guidance > 0):
        reject(d.guidance, "a number > 0.0", "defaults.guidance")
    elif d.boundary is not None:
        reject(d.boundary, "no boundary: only two-expert models (arch.experts) have one", "defaults.boundary")
    if d.frames != 1 and (d.frames - 1) % t_stride:
        reject(d.frames, f"1 or {t_stride}*n+1 frames (VAE time stride)", "defaults.frames")
    for task in dict.fromkeys((*tasks, *d.negative_prompt)):
        if task not in tasks:
            reject(task, "one of the model's tasks: " + ", ".join(tasks), f"defaults.negative_prompt.{task}")
        if task not in d.negative_prompt:
            fail("every task of the model needs a negative prompt", f"defaults.negative_prompt.{task}")


class _LoraEntry(ConfigModel):
    """One LoRA of the registry (``loras:`` of a spec file): where its file(s) come from, the
    models it is made for and the accelerator recipe it belongs to."""

    display_name: Name
    description: Name = ""
    accelerator: Name
    fits: items(Name)
    files: dict[choice(LORA_ROLES), _Source]
    rank: Count
    layout: choice(LORA_LAYOUTS)
    dtype: choice(VARIANTS) = "bf16"
    source: Name

    @model_validator(mode="after")
    def _consistent(self) -> "_LoraEntry":
        roles = set(self.files)
        if roles not in ({"transformer"}, {"high_noise", "low_noise"}):
            fail("give 'transformer' (one network) or 'high_noise' and 'low_noise' (the two experts of Wan 2.2 "
                 f"A14B); got {', '.join(sorted(roles)) or 'none'}", "files")
        for role, source in self.files.items():
            if source.source != "hf" or source.repo is None or len(source.paths) != 1:
                fail("a LoRA file is one file of a Hugging Face repo: give repo and file", f"files.{role}")
        return self


def _lora_entry(lid: str, raw: Any, file: str, models: dict[str, ModelSpec]) -> LoraEntry:
    at = f"loras.{lid}"
    e = validate(_LoraEntry, raw, file, RegistryError, at)
    two = "high_noise" in e.files
    for i, mid in enumerate(e.fits):
        if mid not in models:
            raise RegistryError.say(file, f"{at}.fits.{i}",
                                    f"unknown model {mid!r}; known ids: {', '.join(sorted(models))}")
        if models[mid].is_two_expert != two:
            needs = "two experts: give high_noise and low_noise" if not two else "one network: give transformer"
            raise RegistryError.say(file, f"{at}.files", f"model {mid} has {needs}")
    files = {role: source.build(e.dtype, Path(file).parent) for role, source in e.files.items()}
    return LoraEntry(id=lid, display_name=e.display_name, accelerator=e.accelerator, fits=e.fits,
                     files=MappingProxyType(files), rank=e.rank, layout=e.layout, source=e.source,
                     description=e.description, dtype=e.dtype, source_file=file)


# ----------------------------------------------------------------------------- specs


def _component(name: str, raw: Any, file: str, at: str) -> Component:
    return validate(_Component, raw, file, RegistryError, at).build(name, Path(file).parent)


def _model(mid: str, raw: dict, file: str, shared: dict[str, Component]) -> ModelSpec:
    at = f"models.{mid}"
    m = validate(_Model, raw, file, RegistryError, at)
    files = {}
    for role in (*m.roles, *m.files):
        key, value = f"{at}.files.{role}", m.files.get(role)
        if role not in m.roles:
            raise RegistryError.unknown(file, key, role, m.roles)
        if value is None:
            raise RegistryError.say(file, key, "required key is missing")
        if isinstance(value, str) and value not in shared:
            raise RegistryError.say(file, key, f"unknown shared component {value!r}; "
                                               f"known: {', '.join(sorted(shared))}")
        files[role] = shared[value] if isinstance(value, str) else _component(role, value, file, key)
    return ModelSpec(
        id=mid, display_name=m.display_name, family=m.family, version=m.version, tasks=m.tasks,
        arch=m.arch, vae=m.vae, text_encoder=m.text_encoder,
        needs_clip=m.needs_clip, defaults=m.defaults.build(), sizes=m.sizes,
        default_size=m.default_size or m.sizes[0], sizes_are_max_area=m.sizes_are_max_area,
        files=MappingProxyType(files), test_model=m.test_model, description=m.description,
        unconfirmed=m.unconfirmed, source_file=file)
