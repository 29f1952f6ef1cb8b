"""Profiles: typed memory and speed settings read from YAML files.

A profile decides how a generation uses memory (offload, budgets, pinning, quantisation) and time
(attention backend, compile, VAE tiling, the step savers). It is a frozen dataclass,
:class:`Profile`; its YAML file uses the field names as keys, in the same nested sections::

    # Who this is for
    name: my_profile            # optional: the file name without .yaml
    extends: LowRAM_LowVRAM     # optional: a parent profile, by name or number
    memory:
      prefetch_blocks: 2
    step_savers:
      teacache: {enabled: true, speedup: 2.0}

Defaults live in the dataclasses below, so a file states only what differs. ``extends`` inherits
every setting of the parent (chains are allowed; a cycle or a missing parent is an error);
``name``, ``number``, ``description`` and ``extends`` itself are never inherited.

Where profiles come from: the built-ins in ``profiles/`` at the repository root, then a user
folder (``~/.config/wan-studio/profiles`` unless another is given) whose profiles replace built-ins
of the same name. A user profile may extend the very built-in it replaces (``extends`` naming its
own name). Lookup (:meth:`ProfileSet.get`) takes a name (case-insensitive), a number (``4`` or
``"4"``) or ``"auto"``.

Every error names the file, the dotted key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_DIR = REPO_ROOT / "profiles"
DEFAULT_USER_DIR = Path("~/.config/wan-studio/profiles").expanduser()

OFFLOAD_MODES = ("auto", "none", "model", "blocks")
PIN_MODES = ("all", "transformer", "none")
QUANT_MODES = ("none", "fp8", "fp8_scaled", "int8")
PRECISIONS = ("auto", "bf16", "fp16")
ATTENTION_BACKENDS = ("sdpa", "sage", "sage2", "flash2", "flash3", "xformers")
TILING_MODES = ("auto", "on", "off")
SLG_MODES = ("none", "original", "uncond")
CFG_SKIP_MODES = ("none", "early", "late", "middle", "early_late", "alternate")
RIFLEX_MODES = ("auto", "on", "off")
LORA_MODES = ("hooks", "merge", "auto")  # wan.lora.merge.MERGE_MODES; auto means hooks
# Keys of a profile that are about the file itself, not settings: never inherited or overridden.
IDENTITY_KEYS = ("name", "number", "description", "extends")


class ProfileError(ValueError):
    """A profile file or override is malformed, or a profile name is unknown."""


# ----------------------------------------------------------------------------- value checks
# Each check returns the value in its stored form, or raises _Bad with the allowed values.


class _Bad(Exception):
    def __init__(self, allowed: str):
        super().__init__(allowed)
        self.allowed = allowed


@dataclass(frozen=True)
class _Choice:
    values: tuple[str, ...]
    optional: bool = False

    def __call__(self, v: Any) -> Any:
        if v is None and self.optional:
            return None
        if isinstance(v, bool) and "on" in self.values:  # YAML 1.1 reads on/off as booleans
            v = "on" if v else "off"
        if isinstance(v, str) and v in self.values:
            return v
        raise _Bad("one of " + ", ".join(self.values) + (" or null" if self.optional else ""))


@dataclass(frozen=True)
class _Number:
    kind: type  # int or float
    lo: float | None = None
    hi: float | None = None
    optional: bool = False

    def __call__(self, v: Any) -> Any:
        if v is None and self.optional:
            return None
        ok_types = (int,) if self.kind is int else (int, float)
        in_range = (isinstance(v, ok_types) and not isinstance(v, bool)
                    and (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi))
        if in_range:
            return self.kind(v)
        rng = [f">= {self.lo}" if self.lo is not None else "", f"<= {self.hi}" if self.hi is not None else ""]
        words = "an integer" if self.kind is int else "a number"
        rng_text = " and ".join(r for r in rng if r)
        raise _Bad(words + (f" {rng_text}" if rng_text else "") + (" or null" if self.optional else ""))


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise _Bad("true or false")


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    raise _Bad("a string")


def _parent_ref(v: Any) -> str | None:
    if v is None or (isinstance(v, str) and v.strip()):
        return None if v is None else v.strip()
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise _Bad("a profile name or number, or null")


def _backends(v: Any) -> tuple[str, ...]:
    allowed = "a list of " + ", ".join(ATTENTION_BACKENDS) + " that contains sdpa (the fallback that always works)"
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x in ATTENTION_BACKENDS for x in v):
        raise _Bad(allowed)
    if "sdpa" not in v or len(set(v)) != len(v):
        raise _Bad(allowed + ", each named once")
    return tuple(v)


def _layers(v: Any) -> tuple[int, ...]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        return tuple(v)
    raise _Bad("a list of block indices (integers >= 0)")


def _setting(default: Any, check: Callable[[Any], Any]) -> Any:
    return field(default=default, metadata={"check": check})


def _section(cls: type) -> Any:
    return field(default_factory=cls, metadata={"section": cls})


_FRACTION = _Number(float, 0.0, 1.0)


# ----------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class MemorySettings:
    """Where weights live. Budgets are MiB of GPU memory for a model's permanently resident blocks
    (see :mod:`wan.optim.planner`); ``None`` lets the planner use what is free."""

    offload: str = _setting("auto", _Choice(OFFLOAD_MODES))
    transformer_budget_mb: int | None = _setting(None, _Number(int, 0, optional=True))
    other_budget_mb: int | None = _setting(None, _Number(int, 0, optional=True))
    pin: str = _setting("all", _Choice(PIN_MODES))
    async_transfers: bool = _setting(True, _bool)
    prefetch_blocks: int = _setting(1, _Number(int, 0))
    blocks_to_swap: int | None = _setting(None, _Number(int, 0, optional=True))
    vram_reserve_mb: int = _setting(2048, _Number(int, 0))
    ram_reserve_mb: int = _setting(2048, _Number(int, 0))


@dataclass(frozen=True)
class QuantizeSettings:
    """Weight quantisation of the DiT(s) and of the text encoder; norms, embeddings, head and
    modulation always stay in high precision."""

    transformer: str = _setting("none", _Choice(QUANT_MODES))
    text_encoder: str = _setting("none", _Choice(QUANT_MODES))
    prefer_prequantized: bool = _setting(True, _bool)


@dataclass(frozen=True)
class VaeSettings:
    tiling: str = _setting("auto", _Choice(TILING_MODES))
    tile_px: int = _setting(256, _Number(int, 16))
    overlap_px: int = _setting(64, _Number(int, 0))


@dataclass(frozen=True)
class TeaCacheSettings:
    enabled: bool = _setting(False, _bool)
    speedup: float = _setting(1.75, _Number(float, 1.0, 10.0))
    threshold: float | None = _setting(None, _Number(float, 0.0, optional=True))
    start: float = _setting(0.1, _FRACTION)


@dataclass(frozen=True)
class MagCacheSettings:
    enabled: bool = _setting(False, _bool)
    speedup: float = _setting(2.0, _Number(float, 1.0, 10.0))
    threshold: float | None = _setting(None, _Number(float, 0.0, optional=True))
    max_skips: int = _setting(2, _Number(int, 1))
    start: float = _setting(0.2, _FRACTION)


@dataclass(frozen=True)
class SlgSettings:
    mode: str = _setting("none", _Choice(SLG_MODES))
    layers: tuple[int, ...] = _setting((9,), _layers)
    scale: float = _setting(3.0, _Number(float, 0.0))
    start: float = _setting(0.1, _FRACTION)
    end: float = _setting(0.9, _FRACTION)


@dataclass(frozen=True)
class CfgSkipSettings:
    mode: str = _setting("none", _Choice(CFG_SKIP_MODES))
    ratio: float = _setting(1.0, _FRACTION)


@dataclass(frozen=True)
class CfgZeroStarSettings:
    enabled: bool = _setting(False, _bool)
    zero_init_steps: int = _setting(0, _Number(int, 0))


@dataclass(frozen=True)
class StepSaverSettings:
    teacache: TeaCacheSettings = _section(TeaCacheSettings)
    magcache: MagCacheSettings = _section(MagCacheSettings)
    slg: SlgSettings = _section(SlgSettings)
    cfg_skip: CfgSkipSettings = _section(CfgSkipSettings)
    cfg_zero_star: CfgZeroStarSettings = _section(CfgZeroStarSettings)
    batched_cfg: bool = _setting(False, _bool)
    riflex: str = _setting("auto", _Choice(RIFLEX_MODES))


@dataclass(frozen=True)
class LoraSettings:
    """How a job's LoRAs are applied (``wan.lora.merge``): ``hooks`` add their output at each
    layer, ``merge`` writes them into the weights for the job and restores them exactly after."""

    mode: str = _setting("hooks", _Choice(LORA_MODES))


@dataclass(frozen=True)
class Profile:
    """One named profile. ``source`` is the file it was read from (not a YAML key)."""

    name: str = _setting("", _text)
    number: int | None = _setting(None, _Number(int, 1, 5, optional=True))
    description: str = _setting("", _text)
    extends: str | None = _setting(None, _parent_ref)
    memory: MemorySettings = _section(MemorySettings)
    quantize: QuantizeSettings = _section(QuantizeSettings)
    precision: str = _setting("auto", _Choice(PRECISIONS))
    attention: tuple[str, ...] = _setting(("flash3", "flash2", "sdpa"), _backends)
    compile: bool = _setting(False, _bool)
    vae: VaeSettings = _section(VaeSettings)
    step_savers: StepSaverSettings = _section(StepSaverSettings)
    lora: LoraSettings = _section(LoraSettings)
    source: str = field(default="", compare=False, metadata={"internal": True})

    @property
    def label(self) -> str:
        """``"4 LowRAM_LowVRAM"`` for numbered profiles, else the name."""
        return f"{self.number} {self.name}" if self.number is not None else self.name

    @property
    def is_auto(self) -> bool:
        """The ``auto`` profile: the planner replaces its memory settings by those of 1..5."""
        return self.name.lower() == "auto"


# ----------------------------------------------------------------------------- validation


def _fail(where: str, key: str, value: Any, allowed: str) -> ProfileError:
    return ProfileError(f"{where}: {key or '(top level)'}: {value!r} is not allowed; expected {allowed}")


def _schema_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _validate(raw: Any, cls: type, where: str, prefix: str = "") -> dict:
    """Checks a raw YAML mapping against ``cls``; returns it with values in stored form."""
    fields = _schema_fields(cls)
    if not isinstance(raw, Mapping):
        raise _fail(where, prefix, raw, "a mapping with keys " + ", ".join(fields))
    out = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ProfileError(f"{where}: {dotted}: unknown key{hint}; allowed keys here: {', '.join(fields)}")
        meta = fields[key].metadata
        if "section" in meta:
            out[key] = _validate(value, meta["section"], where, dotted)
            continue
        try:
            out[key] = meta["check"](value)
        except _Bad as e:
            raise _fail(where, dotted, value, e.allowed) from None
    return out


def _merge(base: dict, over: dict) -> dict:
    """Deep merge of validated mappings: sections merge key by key, values (lists too) replace."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _build(cls: type, data: Mapping) -> Any:
    fields = dataclasses.fields(cls)
    kwargs = {}
    for f in fields:
        if f.name in data:
            value = data[f.name]
            kwargs[f.name] = _build(f.metadata["section"], value) if "section" in f.metadata else value
    return cls(**kwargs)


def _check_consistency(p: Profile, where: str) -> None:
    """Rules between fields, which single-value checks cannot see."""
    slg = p.step_savers.slg
    if slg.start > slg.end:
        raise _fail(where, "step_savers.slg.start", slg.start, f"a fraction <= step_savers.slg.end ({slg.end})")
    if p.vae.overlap_px >= p.vae.tile_px:
        raise _fail(where, "vae.overlap_px", p.vae.overlap_px, f"an integer < vae.tile_px ({p.vae.tile_px})")


def profile_to_dict(profile: Profile) -> dict:
    """Plain data (lists, no tuples) with the YAML keys; ``source`` left out."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return list(v) if isinstance(v, tuple) else v
    data = plain(dataclasses.asdict(profile))
    data.pop("source", None)
    return data


# ----------------------------------------------------------------------------- per-job overrides


def parse_override(text: str) -> tuple[str, Any]:
    """``"step_savers.teacache.speedup=2"`` -> ``("step_savers.teacache.speedup", 2)``; the value
    is read as YAML, so ``true``, ``2.0``, ``[9, 10]`` and ``null`` have their types."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ProfileError(f"override {text!r}: expected KEY=VALUE, e.g. step_savers.teacache.enabled=true")
    if value.strip().lower() in ("on", "off", "yes", "no", "y", "n"):
        # YAML 1.1 would read these as booleans; settings such as vae.tiling=on mean the word (a
        # true/false setting then says it wants true or false, rather than guessing)
        return key.strip(), value.strip()
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def apply_overrides(profile: Profile, overrides: Mapping[str, Any], where: str = "override") -> Profile:
    """A copy of ``profile`` with dotted settings replaced, checked as a file would be.

    Args:
        overrides: ``{"step_savers.teacache.enabled": True, "memory": {"pin": "none"}, ...}``;
            a value for a section is a partial mapping merged into it.
    """
    data = profile_to_dict(profile)
    for dotted, value in overrides.items():
        parts = str(dotted).split(".")
        if parts[0] in IDENTITY_KEYS:
            settings = ", ".join(k for k in _schema_fields(Profile) if k not in IDENTITY_KEYS)
            raise ProfileError(f"{where}: {dotted}: cannot be overridden per job; allowed: {settings} "
                               f"and the keys inside them")
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        data = _merge(data, _validate(nested, Profile, where))
    result = dataclasses.replace(_build(Profile, data), source=profile.source)
    _check_consistency(result, where)
    return result


# ----------------------------------------------------------------------------- files and lookup


@dataclass
class _Entry:
    name: str
    raw: dict          # validated, this file's own keys only
    file: str
    shadowed: _Entry | None = None  # the built-in a user profile of the same name replaces


def _read_file(path: Path) -> _Entry:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not valid YAML: {e}") from None
    raw = {} if raw is None else raw
    data = _validate(raw, Profile, str(path))
    name = data.get("name") or path.stem
    if not name.strip() or name.strip().isdigit():
        raise _fail(str(path), "name", name, "a non-empty name that is not a number")
    data["name"] = name.strip()
    return _Entry(data["name"], data, str(path))


def _read_folder(folder: Path) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        entry = _read_file(path)
        key = entry.name.lower()
        if key in entries:
            raise ProfileError(f"{path}: name: {entry.name!r} is already used by {entries[key].file}; "
                               f"expected a name unique within {folder}")
        entries[key] = entry
    return entries


class ProfileSet:
    """The profiles of one load, found by name (case-insensitive), number or ``"auto"``."""

    def __init__(self, profiles: list[Profile]):
        self._by_name = {p.name.lower(): p for p in profiles}
        self._by_number = {p.number: p for p in profiles if p.number is not None}

    def get(self, key: str | int) -> Profile:
        """``4``, ``"4"``, ``"LowRAM_LowVRAM"``, ``"lowram_lowvram"`` and ``"auto"`` all work."""
        if isinstance(key, int) and not isinstance(key, bool):
            if key in self._by_number:
                return self._by_number[key]
        elif isinstance(key, str):
            text = key.strip()
            if text.isdigit() and int(text) in self._by_number:
                return self._by_number[int(text)]
            if text.lower() in self._by_name:
                return self._by_name[text.lower()]
        known = ", ".join(p.label for p in self)
        close = difflib.get_close_matches(str(key).lower(), list(self._by_name), n=1)
        hint = f" Did you mean {self._by_name[close[0]].name}?" if close else ""
        raise ProfileError(f"unknown profile {key!r}.{hint} Known profiles: {known}")

    def names(self) -> list[str]:
        return [p.name for p in self]

    def __iter__(self) -> Iterator[Profile]:
        """Numbered profiles by number, then ``auto``, then the others by name."""
        return iter(sorted(self._by_name.values(),
                           key=lambda p: (p.number is None, p.number or 0, not p.is_auto, p.name.lower())))

    def __contains__(self, key: object) -> bool:
        try:
            self.get(key)  # type: ignore[arg-type]
            return True
        except ProfileError:
            return False

    def __len__(self) -> int:
        return len(self._by_name)


def _resolve(entries: dict[str, _Entry]) -> list[Profile]:
    """Applies ``extends`` (by name or number, over the final set) and builds the dataclasses."""
    by_number = {int(e.raw["number"]): e for e in entries.values() if e.raw.get("number") is not None}
    done: dict[int, dict] = {}  # id(entry) -> merged settings

    def parent_of(entry: _Entry) -> _Entry | None:
        ref = entry.raw.get("extends")
        if ref is None:
            return None
        if ref.lower() == entry.name.lower() and entry.shadowed is not None:
            return entry.shadowed  # a user profile extending the built-in it replaces
        found = by_number.get(int(ref)) if ref.isdigit() else entries.get(ref.lower())
        if found is None:
            known = ", ".join(sorted(e.name for e in entries.values()))
            raise ProfileError(f"{entry.file}: extends: {ref!r} names no profile; expected one of: {known} "
                               f"(or a number {', '.join(str(n) for n in sorted(by_number))})")
        return found

    def merged(entry: _Entry, chain: tuple[_Entry, ...]) -> dict:
        if id(entry) in done:
            return done[id(entry)]
        if any(e is entry for e in chain):
            path = " -> ".join(f"{e.name} ({e.file})" for e in (*chain, entry))
            raise ProfileError(f"{chain[-1].file}: extends: {chain[-1].raw.get('extends')!r} makes a cycle: {path}; "
                               f"expected a chain that ends at a profile without extends")
        parent = parent_of(entry)
        own = {k: v for k, v in entry.raw.items() if k not in IDENTITY_KEYS}
        data = _merge(merged(parent, (*chain, entry)), own) if parent else own
        done[id(entry)] = data
        return data

    profiles = []
    for entry in entries.values():
        identity = {k: entry.raw.get(k) for k in IDENTITY_KEYS if entry.raw.get(k) is not None}
        profile = dataclasses.replace(_build(Profile, {**merged(entry, ()), **identity}), source=entry.file)
        _check_consistency(profile, entry.file)
        profiles.append(profile)
    return profiles


def load_profiles(user_dir: str | Path | None = DEFAULT_USER_DIR,
                  builtin_dir: str | Path | None = BUILTIN_DIR) -> ProfileSet:
    """Reads the built-in profiles, then the user folder, whose profiles replace built-ins by name.

    Args:
        user_dir: folder of the user's profiles; the default one may be absent, a folder passed
            explicitly must exist. None reads the built-ins only.
        builtin_dir: folder of the built-ins (None: no built-ins, for tests).
    """
    entries: dict[str, _Entry] = {}
    if builtin_dir is not None:
        entries.update(_read_folder(Path(builtin_dir)))
    if user_dir is not None:
        folder = Path(user_dir).expanduser()
        if folder.is_dir():
            for key, entry in _read_folder(folder).items():
                entry.shadowed = entries.get(key)
                if entry.shadowed is not None:  # a replacement keeps the number and words it omits
                    for k in ("number", "description"):
                        if entry.raw.get(k) is None and entry.shadowed.raw.get(k) is not None:
                            entry.raw[k] = entry.shadowed.raw[k]
                entries[key] = entry
        elif Path(user_dir) != DEFAULT_USER_DIR:
            raise ProfileError(f"profile folder {folder}: no such folder")
    numbers: dict[int, _Entry] = {}
    for entry in entries.values():
        n = entry.raw.get("number")
        if n is not None and n in numbers:
            raise ProfileError(f"{entry.file}: number: {n} is already used by {numbers[n].file}; "
                               f"expected a number no other profile has (or remove it)")
        if n is not None:
            numbers[n] = entry
    return ProfileSet(_resolve(entries))


def get_profile(key: str | int, user_dir: str | Path | None = DEFAULT_USER_DIR) -> Profile:
    """One profile by name, number or ``"auto"`` (see :meth:`ProfileSet.get`)."""
    return load_profiles(user_dir).get(key)
