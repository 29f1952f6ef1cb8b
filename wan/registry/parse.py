"""Reading spec YAML files into :mod:`wan.registry.specs` dataclasses, with validation whose
errors name the file and the dotted key."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Iterable, Mapping, NoReturn, Sequence

from wan.registry.specs import (_DOTTED_RE, _REPO_RE, _SIZE_RE, EXPERTS, MODEL_TYPES, SAMPLERS, TASKS, VAE_SHAPES,
                                VARIANTS, Arch, Component, Defaults, FileSource, ModelSpec, RegistryError, VaeSpec)


# ----------------------------------------------------------------------------- reading files


def _read_folder(folder: Path) -> tuple[dict, dict]:
    """Raw models and components of every ``*.yaml``/``*.yml`` in a folder; an id defined twice
    in one folder is an error (which one wins would depend on file names)."""
    models: dict[str, tuple[dict, str]] = {}
    components: dict[str, tuple[Any, str]] = {}
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        data = _load_yaml(path)
        where = _Where(str(path))
        _check_keys(data, where, {"family", "components", "models"}, skip_prefix="x-")
        family = data.get("family")
        if family is not None:
            _str(family, where.key("family"))
        for name, raw in _mapping(data.get("components", {}), where.key("components")).items():
            if name in components:
                where.key(f"components.{name}").fail(
                    f"component defined twice in this folder (also in {components[name][1]})")
            components[name] = (raw, str(path))
        for mid, raw in _mapping(data.get("models", {}), where.key("models")).items():
            spec_where = where.key(f"models.{mid}")
            raw = dict(_mapping(raw, spec_where))
            if mid in models:
                spec_where.fail(f"model id defined twice in this folder (also in {models[mid][1]})")
            if family is not None:
                raw.setdefault("family", family)
            models[mid] = (raw, str(path))
    return models, components


def _load_yaml(path: Path) -> dict:
    import yaml

    class _StrictLoader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""

    def construct_mapping(loader, node, deep=False):
        # Scalar key text is enough here ("<<" merge keys are plain scalars too).
        keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
        dup = {k for k in keys if keys.count(k) > 1 and k != "<<"}
        if dup:
            raise RegistryError(f"{path}: line {node.start_mark.line + 1}: duplicate key(s) "
                                f"{', '.join(map(str, sorted(dup, key=str)))}")
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    _StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _resolve_inheritance(layer: dict, earlier: dict) -> dict:
    """Applies ``inherit:`` inside one folder. A parent is a model of this folder, or of the
    earlier folders (always so when a spec inherits its own id)."""
    done: dict[str, tuple[dict, str]] = {}

    def resolve(mid: str, chain: tuple[str, ...]) -> tuple[dict, str]:
        if mid in done:
            return done[mid]
        raw, file = layer[mid]
        parent = raw.get("inherit")
        if parent is None:
            done[mid] = (raw, file)
            return done[mid]
        where = _Where(file, f"models.{mid}.inherit")
        _str(parent, where)
        if parent != mid and parent in layer:
            if parent in chain:
                where.fail(f"inheritance cycle: {' -> '.join(chain + (parent,))}")
            base = resolve(parent, chain + (parent,))[0]
        elif parent in earlier:
            base = earlier[parent][0]
        else:
            known = sorted(set(layer) | set(earlier))
            where.fail(f"inherits unknown model {parent!r}; known ids: {', '.join(known)}")
        child = {k: v for k, v in raw.items() if k != "inherit"}
        done[mid] = (_merge(base, child), file)
        return done[mid]

    for mid in layer:
        resolve(mid, (mid,))
    return done


# Mappings a child spec replaces whole instead of merging into: a finetune's transformer must not
# keep the variants of the model it starts from, a t2i spec must not keep the t2v prompts.
_REPLACED_WHOLE = ("files.*", "defaults.negative_prompt", "defaults.shift_at_size",
                   "defaults.guidance", "arch.extras")


def _merge(base: dict, child: dict, path: str = "") -> dict:
    """Deep merge of spec dicts, except for the paths in ``_REPLACED_WHOLE``."""
    out = dict(base)
    for key, value in child.items():
        here = f"{path}.{key}" if path else str(key)
        whole = here in _REPLACED_WHOLE or f"{path}.*" in _REPLACED_WHOLE
        if not whole and isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value, here)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- validation helpers


class _Where:
    """A position in a spec file, for error messages: ``file: models.x.arch.dim: ...``."""

    def __init__(self, file: str, path: str = ""):
        self.file, self.path = file, path

    def key(self, name: str) -> "_Where":
        return _Where(self.file, f"{self.path}.{name}" if self.path else name)

    def fail(self, message: str) -> NoReturn:
        raise RegistryError(f"{self.file}: {self.path or '<top>'}: {message}")


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _mapping(value: Any, where: _Where) -> dict:
    if not isinstance(value, dict):
        where.fail(f"expected a mapping, got {_got(value)}")
    return value


def _check_keys(value: dict, where: _Where, allowed: set[str], required: Iterable[str] = (),
                skip_prefix: str | None = None) -> None:
    for key in value:
        if skip_prefix and isinstance(key, str) and key.startswith(skip_prefix):
            continue
        if key not in allowed:
            where.key(str(key)).fail(f"unknown key {key!r}; allowed keys: {', '.join(sorted(allowed))}")
    for key in required:
        if key not in value:
            where.key(key).fail("required key is missing")


def _str(value: Any, where: _Where, choices: Sequence[str] | None = None) -> str:
    if not isinstance(value, str) or not value:
        where.fail(f"expected a non-empty string, got {_got(value)}")
    if choices is not None and value not in choices:
        where.fail(f"got {value!r}, expected one of: {', '.join(choices)}")
    return value


def _int(value: Any, where: _Where, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        where.fail(f"expected an integer, got {_got(value)}")
    if value < minimum:
        where.fail(f"expected an integer >= {minimum}, got {value}")
    return value


def _float(value: Any, where: _Where, low: float = 0.0, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        where.fail(f"expected a number, got {_got(value)}")
    if value <= low or (high is not None and value >= high):
        where.fail(f"expected a number in ({low}, {high if high is not None else 'inf'}), got {value}")
    return float(value)


def _bool(value: Any, where: _Where) -> bool:
    return value if isinstance(value, bool) else where.fail(f"expected true or false, got {_got(value)}")


def _list(value: Any, where: _Where) -> list:
    return value if isinstance(value, list) and value else where.fail(
        f"expected a non-empty list, got {_got(value)}")


def _version(value: Any, where: _Where) -> str:
    # YAML reads an unquoted 2.1 as a float; accept it and spell it as a string.
    text = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    return _str(text, where, tuple(VAE_SHAPES))


def _size(value: Any, where: _Where) -> tuple[int, int]:
    match = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not match:
        where.fail(f"expected a size written WIDTHxHEIGHT such as '832x480', got {_got(value)}")
    return int(match.group(1)), int(match.group(2))


def _rel_path(value: Any, where: _Where) -> str:
    """A path inside a repo or the checkpoint folder: relative, no '..' (specs may come from users)."""
    text = _str(value, where)
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts or "\\" in text:
        where.fail(f"expected a relative path with '/' separators and no '..', got {text!r}")
    return str(path)


# ----------------------------------------------------------------------------- sections

_SOURCE_KEYS = {"repo", "file", "files", "folder", "shards", "size", "sizes", "verified",
                "source", "generator", "note"}


def _source(raw: Any, where: _Where, variant: str) -> FileSource:
    raw = _mapping(raw, where)
    _check_keys(raw, where, _SOURCE_KEYS)
    kind = _str(raw.get("source", "hf"), where.key("source"), ("hf", "generated"))
    repo = generator = None
    if kind == "hf":
        repo = _str(raw.get("repo"), where.key("repo"))
        if not _REPO_RE.match(repo):
            where.key("repo").fail(f"expected a Hugging Face repo id 'owner/name', got {repo!r}")
        if "generator" in raw:
            where.key("generator").fail("only files with 'source: generated' have a generator")
    else:
        if "repo" in raw:
            where.key("repo").fail("generated files come from no repo")
        generator = _str(raw.get("generator"), where.key("generator"))
        if not _DOTTED_RE.match(generator):
            where.key("generator").fail(f"expected a dotted function name, got {generator!r}")
    if ("file" in raw) == ("files" in raw):
        where.fail("give exactly one of 'file' (one file) or 'files' (a list)")
    if "file" in raw:
        first = _rel_path(raw["file"], where.key("file"))
        if "shards" in raw:
            files, open_path = _shard_names(first, _int(raw["shards"], where.key("shards")), where)
        else:
            files, open_path = (first,), first
        if "folder" in raw:
            where.key("folder").fail("'folder' goes with 'files'")
    else:
        files = tuple(_rel_path(f, where.key(f"files[{i}]"))
                      for i, f in enumerate(_list(raw["files"], where.key("files"))))
        if "shards" in raw:
            where.key("shards").fail("'shards' goes with 'file' (the index json)")
        open_path = _rel_path(raw.get("folder"), where.key("folder")) if "folder" in raw else None
        if open_path is None:
            where.key("folder").fail("a list of files needs 'folder': the path a loader opens")
    sizes = _sizes(raw, files, where)
    note = _str(raw["note"], where.key("note")) if "note" in raw else ""
    verified = _bool(raw.get("verified", True), where.key("verified"))
    return FileSource(variant, repo, files, open_path, sizes, verified, generator, note)


def _shard_names(index: str, count: int, where: _Where) -> tuple[tuple[str, ...], str]:
    """Standard HF sharding: ``x.safetensors.index.json`` + ``x-0000i-of-0000n.safetensors``."""
    suffix = ".safetensors.index.json"
    if not index.endswith(suffix):
        where.key("file").fail(f"with 'shards', 'file' is the index and must end with {suffix!r}")
    stem = index[: -len(suffix)]
    shards = tuple(f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1))
    parent = str(PurePosixPath(index).parent)
    return (index, *shards), "" if parent == "." else parent


def _sizes(raw: dict, files: tuple[str, ...], where: _Where) -> Mapping[str, int]:
    sizes: dict[str, int] = {}
    if "size" in raw:
        if len(files) != 1:
            where.key("size").fail("'size' is for a single file; use 'sizes: {path: bytes}'")
        sizes[files[0]] = _int(raw["size"], where.key("size"))
    for path, value in _mapping(raw.get("sizes", {}), where.key("sizes")).items():
        if path not in files:
            where.key(f"sizes.{path}").fail(f"not one of this entry's files: {', '.join(files)}")
        sizes[path] = _int(value, where.key(f"sizes.{path}"))
    return MappingProxyType(sizes)


def _component(raw: Any, where: _Where, name: str) -> Component:
    raw = _mapping(raw, where)
    _check_keys(raw, where, {"default", "variants"}, required=("variants",))
    table = _mapping(raw["variants"], where.key("variants"))
    if not table:
        where.key("variants").fail("expected at least one variant")
    variants = {}
    for variant, entry in table.items():
        _str(variant, where.key(f"variants.{variant}"), VARIANTS)
        variants[variant] = _source(entry, where.key(f"variants.{variant}"), variant)
    default = raw.get("default", next(iter(variants)))
    _str(default, where.key("default"), tuple(variants))
    return Component(name, default, MappingProxyType(variants))


_ARCH_KEYS = {"dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "model_type",
              "text_dim", "freq_dim", "text_len", "patch_size", "eps", "vace_layers",
              "vace_in_dim", "experts", "extras"}


def _arch(raw: Any, where: _Where) -> Arch:
    raw = _mapping(raw, where)
    _check_keys(raw, where, _ARCH_KEYS,
                required=("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "model_type"))
    ints = {k: _int(raw[k], where.key(k)) for k in
            ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim",
             "freq_dim", "text_len") if k in raw}
    if ints["dim"] % ints["num_heads"]:
        where.key("num_heads").fail(f"dim {ints['dim']} is not divisible by num_heads {ints['num_heads']}")
    model_type = _str(raw["model_type"], where.key("model_type"), MODEL_TYPES)
    patch = tuple(_int(p, where.key("patch_size")) for p in _list(raw.get("patch_size", [1, 2, 2]),
                                                                   where.key("patch_size")))
    if len(patch) != 3:
        where.key("patch_size").fail(f"expected 3 integers (t, h, w), got {list(patch)}")
    vace_layers = vace_in_dim = None
    if model_type == "vace":
        vace_layers = tuple(_int(i, where.key("vace_layers"), minimum=0)
                            for i in _list(raw.get("vace_layers"), where.key("vace_layers")))
        if max(vace_layers) >= ints["num_layers"]:
            where.key("vace_layers").fail(f"layer {max(vace_layers)} >= num_layers {ints['num_layers']}")
        vace_in_dim = _int(raw.get("vace_in_dim"), where.key("vace_in_dim"))
    elif "vace_layers" in raw or "vace_in_dim" in raw:
        where.key("vace_layers").fail("only model_type 'vace' has VACE layers")
    experts = ()
    if "experts" in raw:
        listed = _list(raw["experts"], where.key("experts"))
        experts = tuple(_str(e, where.key("experts"), EXPERTS) for e in listed)
        if experts != EXPERTS:
            where.key("experts").fail(f"expected {list(EXPERTS)} (high-noise first), got {list(experts)}")
    extras = MappingProxyType(dict(_mapping(raw.get("extras", {}), where.key("extras"))))
    eps = _float(raw.get("eps", 1e-6), where.key("eps"))
    return Arch(model_type=model_type, patch_size=patch, eps=eps, vace_layers=vace_layers,
                vace_in_dim=vace_in_dim, experts=experts, extras=extras, **ints)


def _vae(raw: Any, where: _Where) -> VaeSpec:
    raw = _mapping(raw, where)
    _check_keys(raw, where, {"version", "stride", "z_dim"}, required=("version", "stride", "z_dim"))
    version = _version(raw["version"], where.key("version"))
    stride = tuple(_int(s, where.key("stride")) for s in _list(raw["stride"], where.key("stride")))
    z_dim = _int(raw["z_dim"], where.key("z_dim"))
    want_stride, want_z = VAE_SHAPES[version]
    if stride != want_stride:
        where.key("stride").fail(f"VAE {version} has stride {list(want_stride)}, got {list(stride)}")
    if z_dim != want_z:
        where.key("z_dim").fail(f"VAE {version} has {want_z} latent channels, got {z_dim}")
    return VaeSpec(version, stride, z_dim)


_DEFAULTS_KEYS = {"steps", "shift", "guidance", "boundary", "fps", "frames", "sampler",
                  "negative_prompt", "shift_at_size"}


def _defaults(raw: Any, where: _Where, experts: bool, tasks: tuple[str, ...], t_stride: int) -> Defaults:
    raw = _mapping(raw, where)
    _check_keys(raw, where, _DEFAULTS_KEYS,
                required=("steps", "shift", "guidance", "fps", "frames", "sampler", "negative_prompt"))
    guidance, high = _guidance(raw["guidance"], where.key("guidance"), experts)
    boundary = raw.get("boundary")
    if experts:
        boundary = _float(boundary, where.key("boundary"), 0.0, 1.0)
    elif boundary is not None:
        where.key("boundary").fail("only two-expert models (arch.experts) have a boundary")
    frames = _int(raw["frames"], where.key("frames"))
    if frames != 1 and (frames - 1) % t_stride:
        where.key("frames").fail(f"expected 1 or {t_stride}*n+1 frames (VAE time stride), got {frames}")
    negative = {}
    for task, text in _mapping(raw["negative_prompt"], where.key("negative_prompt")).items():
        _str(task, where.key(f"negative_prompt.{task}"), tasks)
        negative[task] = text if isinstance(text, str) else _str(text, where.key(f"negative_prompt.{task}"))
    for task in tasks:
        if task not in negative:
            where.key(f"negative_prompt.{task}").fail("every task of the model needs a negative prompt")
    shift_at = {_size(s, where.key(f"shift_at_size.{s}")): _float(v, where.key(f"shift_at_size.{s}"))
                for s, v in _mapping(raw.get("shift_at_size", {}), where.key("shift_at_size")).items()}
    return Defaults(
        steps=_int(raw["steps"], where.key("steps")),
        shift=_float(raw["shift"], where.key("shift")),
        guidance=guidance, guidance_high_noise=high, boundary=boundary,
        fps=_int(raw["fps"], where.key("fps")), frames=frames,
        sampler=_str(raw["sampler"], where.key("sampler"), SAMPLERS),
        negative_prompt=MappingProxyType(negative), shift_at_size=MappingProxyType(shift_at))


def _guidance(raw: Any, where: _Where, experts: bool) -> tuple[float, float | None]:
    if not experts:
        return _float(raw, where), None
    if not isinstance(raw, dict):
        where.fail(f"a two-expert model needs {{low_noise: x, high_noise: y}}, got {_got(raw)}")
    _check_keys(raw, where, {"low_noise", "high_noise"}, required=("low_noise", "high_noise"))
    return (_float(raw["low_noise"], where.key("low_noise")),
            _float(raw["high_noise"], where.key("high_noise")))


def _files(raw: Any, where: _Where, shared: Mapping[str, Component], roles: tuple[str, ...]) -> dict:
    raw = _mapping(raw, where)
    _check_keys(raw, where, set(roles), required=roles)
    out = {}
    for role, value in raw.items():
        if isinstance(value, str):
            if value not in shared:
                where.key(role).fail(
                    f"unknown shared component {value!r}; known: {', '.join(sorted(shared))}")
            out[role] = shared[value]
        else:
            out[role] = _component(value, where.key(role), role)
    return MappingProxyType(out)


_MODEL_KEYS = {"display_name", "description", "family", "version", "tasks", "test_model", "arch",
               "vae", "text_encoder", "needs_clip", "defaults", "sizes", "default_size",
               "sizes_are_max_area", "files", "unconfirmed"}


def _model(mid: str, raw: dict, file: str, shared: Mapping[str, Component]) -> ModelSpec:
    where = _Where(file, f"models.{mid}")
    _check_keys(raw, where, _MODEL_KEYS,
                required=("display_name", "family", "version", "tasks", "arch", "vae",
                          "text_encoder", "needs_clip", "defaults", "sizes", "files"))
    tasks = tuple(_str(t, where.key("tasks"), TASKS) for t in _list(raw["tasks"], where.key("tasks")))
    arch = _arch(raw["arch"], where.key("arch"))
    vae = _vae(raw["vae"], where.key("vae"))
    if arch.out_dim != vae.z_dim:
        where.key("arch.out_dim").fail(f"{arch.out_dim} differs from the VAE's {vae.z_dim} latent channels")
    sizes = tuple(_size(s, where.key("sizes")) for s in _list(raw["sizes"], where.key("sizes")))
    multiple = vae.stride[1] * arch.patch_size[1]
    for w, h in sizes:
        if w % multiple or h % multiple:
            where.key("sizes").fail(f"{w}x{h} is not a multiple of {multiple} (VAE stride x patch)")
    default_size = (_size(raw["default_size"], where.key("default_size"))
                    if "default_size" in raw else sizes[0])
    if default_size not in sizes:
        where.key("default_size").fail(f"{default_size[0]}x{default_size[1]} is not one of the sizes")
    needs_clip = _bool(raw["needs_clip"], where.key("needs_clip"))
    roles = tuple(f"transformer_{e}" for e in arch.experts) or ("transformer",)
    roles += ("vae", "text_encoder", "tokenizer") + (("clip",) if needs_clip else ())
    unconfirmed = tuple(_str(u, where.key("unconfirmed"))
                        for u in (_list(raw["unconfirmed"], where.key("unconfirmed"))
                                  if "unconfirmed" in raw else ()))
    return ModelSpec(
        id=mid,
        display_name=_str(raw["display_name"], where.key("display_name")),
        family=_str(raw["family"], where.key("family")),
        version=_version(raw["version"], where.key("version")),
        tasks=tasks, arch=arch, vae=vae,
        text_encoder=_str(raw["text_encoder"], where.key("text_encoder")),
        needs_clip=needs_clip,
        defaults=_defaults(raw["defaults"], where.key("defaults"), bool(arch.experts), tasks, vae.stride[0]),
        sizes=sizes, default_size=default_size,
        sizes_are_max_area=_bool(raw.get("sizes_are_max_area", False), where.key("sizes_are_max_area")),
        files=_files(raw["files"], where.key("files"), shared, roles),
        test_model=_bool(raw.get("test_model", False), where.key("test_model")),
        description=_str(raw["description"], where.key("description")) if "description" in raw else "",
        unconfirmed=unconfirmed, source_file=file)
