"""The LoRA drop-in folder: scanning (header only) and named presets.

Layout under the LoRA root (``loras/`` by default, overridable by flag)::

    loras/<family folder>/**.safetensors     LoRA files, subfolders allowed
    loras/presets/<name>.json                presets written here
    loras/presets/<name>.lset                Wan2GP presets, read only

A LoRA's ``name`` is its path inside its family folder, POSIX style, without the suffix
(``style/anime_v2``). Scanning reads only safetensors headers, never tensor data, and caches by
(path, mtime, size), so a refresh is a cheap rescan.

Preset and LoRA names can never escape the LoRA root: see ``check_preset_name`` and
``check_lora_name``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from wan.fileio import write_text_atomic as _write_atomic
from wan.loading.files import CheckpointError, read_safetensors_header
from wan.lora.schedule import parse_multiplier

# Model family -> folder name under the LoRA root (the folder is named after the family).
FAMILY_FOLDERS: dict[str, str] = {
    "wan2.1-t2v-1.3B": "wan2.1-t2v-1.3B",
    "wan2.1-t2v-14B": "wan2.1-t2v-14B",
    "wan2.1-i2v-14B": "wan2.1-i2v-14B",
    "wan2.2-a14b": "wan2.2-a14b",
    "wan2.2-ti2v-5B": "wan2.2-ti2v-5B",
    "test": "test",  # the tiny TEST models of the registry (tests and demos)
}
# DiT width -> LoRA family, for models of one expert and no image input
_FAMILY_BY_WIDTH = {1536: "wan2.1-t2v-1.3B", 3072: "wan2.2-ti2v-5B", 5120: "wan2.1-t2v-14B"}
PRESETS_FOLDER = "presets"
LORA_SUFFIXES = (".safetensors", ".sft")
PRESET_SUFFIX = ".json"
LSET_SUFFIX = ".lset"
MAX_TRIGGER_WORDS = 10
_MAX_NAME = 120
_FORBIDDEN_CHARS = set('<>:"|?*\\/') | {chr(c) for c in range(32)}
PRESET_NAME_RULE = ("a preset name is a plain file name: 1-120 characters, no path separators ('/' or '\\'), "
                    "no '..', no leading '.', none of <>:\"|?* or control characters")
LORA_NAME_RULE = ("a LoRA name is a relative path inside its family folder: parts separated by '/', "
                  "no '..' or '.' parts, no leading '/', no drive letter, none of <>:\"|?*\\ or control characters")


@dataclass(frozen=True)
class LoraInfo:
    """One LoRA file found by a scan.

    Attributes:
        name: path inside the family folder without suffix, POSIX separators.
        path: the file.
        family: the family whose folder holds it.
        size_bytes: file size.
        rank: rows of the first ``lora_down`` / ``lora_A`` weight (sorted key order), None if none.
        trigger_words: from ``modelspec.trigger_phrase`` or the most frequent ``ss_tag_frequency`` tags.
        description: from the ``description`` or ``modelspec.description`` metadata.
        error: why the header could not be read (the file is still listed so the user sees it).
    """

    name: str
    path: Path
    family: str
    size_bytes: int
    rank: int | None = None
    trigger_words: tuple[str, ...] = ()
    description: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Preset:
    """A named set of LoRAs with their multipliers (strings, see wan.lora.schedule) and a prompt."""

    name: str
    loras: tuple[tuple[str, str], ...]
    prompt: str | None
    path: Path


# ---------------------------------------------------------------- scan

# resolved path -> (mtime_ns, size, info); module level so every scan of a process shares it.
_CACHE: dict[Path, tuple[int, int, LoraInfo]] = {}


def clear_cache() -> None:
    _CACHE.clear()


def scan_loras(root: Path, family: str | None = None) -> list[LoraInfo]:
    """Lists the LoRAs of one family folder, or of every family folder when ``family`` is None.

    Missing folders give an empty list. Sorted by (family, name).
    """
    root = Path(root)
    families = [_check_family(family)] if family is not None else list(FAMILY_FOLDERS)
    found = []
    for fam in families:
        folder = root / FAMILY_FOLDERS[fam]
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file()):
            found.append(_cached_info(path, folder, fam))
    return found


def family_for_model(spec) -> str | None:
    """The LoRA family folder a registry model (``ModelSpec``) reads its LoRAs from, or None for an
    architecture no family folder covers. LoRAs are shared by shape, so finetunes of a family and
    its VACE/Fun variants read the same folder; i2v/flf2v 14B models (image cross-attention) and
    the Wan 2.2 A14B experts have their own."""
    if spec.test_model:
        return "test"
    if spec.arch.experts:
        return "wan2.2-a14b"
    if spec.arch.dim == 5120 and spec.arch.model_type in ("i2v", "flf2v"):
        return "wan2.1-i2v-14B"
    return _FAMILY_BY_WIDTH.get(spec.arch.dim)


def _check_family(family: str) -> str:
    if family not in FAMILY_FOLDERS:
        raise ValueError(f"LoRA family {family!r} is unknown; expected one of {sorted(FAMILY_FOLDERS)}")
    return family


def _cached_info(path: Path, folder: Path, family: str) -> LoraInfo:
    stat = path.stat()
    key = path.resolve()
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == stat.st_mtime_ns and hit[1] == stat.st_size:
        return hit[2]
    name = path.relative_to(folder).with_suffix("").as_posix()
    info = read_lora_info(path, name=name, family=family)
    _CACHE[key] = (stat.st_mtime_ns, stat.st_size, info)
    return info


def read_lora_info(path: Path, name: str | None = None, family: str = "") -> LoraInfo:
    """Reads what a listing shows from the safetensors header only; a bad file gets ``error`` set."""
    path = Path(path)
    size = path.stat().st_size
    name = name if name is not None else path.stem
    try:
        header, _ = read_safetensors_header(path)
    except CheckpointError as exc:
        return LoraInfo(name=name, path=path, family=family, size_bytes=size, error=str(exc))
    meta = header.pop("__metadata__", None) or {}
    return LoraInfo(name=name, path=path, family=family, size_bytes=size, rank=_rank(header),
                    trigger_words=_trigger_words(meta), description=_description(meta))


def _rank(header: dict) -> int | None:
    """Rank = rows of the first down/A projection (the same for every layer in almost all files)."""
    for key in sorted(header):
        if key.endswith((".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight")):
            shape = header[key].get("shape") or []
            return int(shape[0]) if shape else None
    return None


def _trigger_words(meta: dict) -> tuple[str, ...]:
    phrase = meta.get("modelspec.trigger_phrase")
    if isinstance(phrase, str) and phrase.strip():
        return tuple(w.strip() for w in phrase.split(",") if w.strip())
    return _top_tags(meta.get("ss_tag_frequency"))


def _top_tags(raw) -> tuple[str, ...]:
    """Most frequent tags over all datasets of kohya's ``ss_tag_frequency`` ({dataset: {tag: n}})."""
    if not isinstance(raw, str):
        return ()
    try:
        datasets = json.loads(raw)
    except json.JSONDecodeError:
        return ()  # metadata is informative only; a malformed field must not hide the LoRA
    totals: dict[str, int] = {}
    for tags in datasets.values() if isinstance(datasets, dict) else ():
        for tag, count in tags.items() if isinstance(tags, dict) else ():
            if isinstance(count, (int, float)) and tag.strip():
                totals[tag.strip()] = totals.get(tag.strip(), 0) + int(count)
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(tag for tag, _ in ranked[:MAX_TRIGGER_WORDS])


def _description(meta: dict) -> str | None:
    for key in ("description", "modelspec.description"):
        value = meta.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def resolve_lora(root: Path, family: str, name: str) -> Path:
    """The file of LoRA ``name`` (as listed by ``scan_loras``) in ``family``'s folder.

    Raises ValueError for a name that would leave the folder, FileNotFoundError if absent.
    """
    folder = (Path(root) / FAMILY_FOLDERS[_check_family(family)]).resolve()
    check_lora_name(name)
    for suffix in ("",) + LORA_SUFFIXES:
        # Checked lexically, not through links: a user may link a LoRA kept elsewhere into the folder
        # on purpose; what must never happen is a *name* reaching outside it.
        candidate = Path(os.path.normpath(folder / (name + suffix)))
        if not candidate.is_relative_to(folder):
            raise ValueError(f"LoRA name {name!r} resolves outside {folder}; {LORA_NAME_RULE}")
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"LoRA {name!r} not found in {folder} (tried suffixes {LORA_SUFFIXES})")


# ---------------------------------------------------------------- names


def check_preset_name(name: str) -> str:
    """Returns ``name`` if it is a safe plain file name, else raises ValueError naming it."""
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME or name.startswith(".") \
            or any(c in _FORBIDDEN_CHARS for c in name) or name != name.strip():
        raise ValueError(f"preset name {name!r} is not allowed: {PRESET_NAME_RULE} "
                         f"(and no leading/trailing spaces)")
    return name


def check_lora_name(name: str) -> str:
    """Returns ``name`` if it is a safe relative LoRA path, else raises ValueError naming it."""
    bad = (not isinstance(name, str) or not name or name.startswith("/")
           or any(c in _FORBIDDEN_CHARS - {"/"} for c in name))
    if not bad:
        bad = any(part in ("", ".", "..") for part in name.split("/"))
    if bad:
        raise ValueError(f"LoRA name {name!r} is not allowed: {LORA_NAME_RULE}")
    return name


def _preset_path(root: Path, name: str, suffix: str) -> Path:
    folder = (Path(root) / PRESETS_FOLDER).resolve()
    path = Path(os.path.normpath(folder / (check_preset_name(name) + suffix)))
    # Second line of defence (lexical): whatever the name checks might miss, stay inside the folder.
    if path.parent != folder:
        raise ValueError(f"preset name {name!r} resolves outside {folder}; {PRESET_NAME_RULE}")
    return path


# ---------------------------------------------------------------- presets


def save_preset(root: Path, name: str, loras: Iterable[tuple[str, str | float]],
                prompt: str | None = None) -> Path:
    """Writes ``loras/presets/<name>.json`` atomically (replacing an existing one) and returns it.

    Every LoRA name and multiplier is validated first, so a bad preset is never written.
    """
    path = _preset_path(root, name, PRESET_SUFFIX)
    entries = [_checked_entry(lora, mult, f"preset {name!r}") for lora, mult in loras]
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"preset {name!r}: prompt must be a string or None, got {type(prompt).__name__}")
    data = {"format": "wan-studio-lora-preset", "version": 1,
            "loras": [{"name": n, "multiplier": m} for n, m in entries], "prompt": prompt}
    _write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def _checked_entry(lora: str, mult, where: str) -> tuple[str, str]:
    check_lora_name(lora)
    try:
        text = parse_multiplier(mult).text
    except ValueError as exc:
        raise ValueError(f"{where}, LoRA {lora!r}: {exc}") from None
    return lora, text


def load_preset(root: Path, name: str) -> Preset:
    """Reads preset ``name``: our ``.json`` if present, else a Wan2GP ``.lset``."""
    path = _preset_path(root, name, PRESET_SUFFIX)
    if path.is_file():
        return _read_json_preset(path, name)
    lset = _preset_path(root, name, LSET_SUFFIX)
    if lset.is_file():
        return _read_lset(lset, name)
    raise FileNotFoundError(f"preset {name!r} not found in {path.parent} (looked for {path.name} and {lset.name})")


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"preset file {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"preset file {path}: expected a JSON object, got {type(data).__name__}")  # noqa: TRY004 - ValueError for all bad input
    return data


def _read_json_preset(path: Path, name: str) -> Preset:
    data = _load_json(path)
    loras = data.get("loras")
    if not isinstance(loras, list) or not all(isinstance(e, dict) and "name" in e for e in loras):
        raise ValueError(f"preset file {path}: field 'loras' must be a list of {{'name', 'multiplier'}} objects")
    entries = tuple(_checked_entry(e["name"], e.get("multiplier", "1"), f"preset file {path}") for e in loras)
    return Preset(name=name, loras=entries, prompt=_prompt(data, path), path=path)


def _prompt(data: dict, path: Path) -> str | None:
    prompt = data.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"preset file {path}: field 'prompt' must be a string, got {type(prompt).__name__}")
    return prompt or None


def _read_lset(path: Path, name: str) -> Preset:
    """Wan2GP ``.lset``: ``loras`` (file names), ``loras_mult`` (one string, multipliers separated by
    spaces or newlines, ``#`` comment lines, ``|`` as a separator; or a list), ``prompt``."""
    data = _load_json(path)
    files = data.get("loras", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"preset file {path}: field 'loras' must be a list of file names")
    mults = _lset_multipliers(data.get("loras_mult", ""), path)
    entries = []
    for i, file in enumerate(files):
        lora = file.replace("\\", "/")
        for suffix in LORA_SUFFIXES:
            if lora.lower().endswith(suffix):
                lora = lora[: -len(suffix)]
        # Wan2GP fills missing multipliers with 1.
        entries.append(_checked_entry(lora, mults[i] if i < len(mults) else "1", f"preset file {path}"))
    return Preset(name=name, loras=tuple(entries), prompt=_prompt(data, path), path=path)


def _lset_multipliers(raw, path: Path) -> list[str]:
    if isinstance(raw, list):
        return [str(m).strip() for m in raw]
    if not isinstance(raw, str):
        raise ValueError(f"preset file {path}: field 'loras_mult' must be a string or a list")  # noqa: TRY004 - ValueError for all bad input
    lines = [ln.strip() for ln in raw.replace("\r", "").split("\n")]
    joined = " ".join(ln for ln in lines if ln and not ln.startswith("#"))
    return joined.replace("|", " ").split()


def delete_preset(root: Path, name: str) -> None:
    """Deletes preset ``name`` (both its ``.json`` and ``.lset`` if both exist)."""
    paths = [_preset_path(root, name, s) for s in (PRESET_SUFFIX, LSET_SUFFIX)]
    existing = [p for p in paths if p.is_file()]
    if not existing:
        raise FileNotFoundError(f"preset {name!r} not found in {paths[0].parent}")
    for p in existing:
        p.unlink()


def list_presets(root: Path) -> list[str]:
    """Sorted names of the presets (``.json`` and ``.lset``) in ``loras/presets``."""
    folder = Path(root) / PRESETS_FOLDER
    if not folder.is_dir():
        return []
    names = {p.stem for p in folder.iterdir()
             if p.is_file() and p.suffix in (PRESET_SUFFIX, LSET_SUFFIX) and not p.name.startswith(".")}
    return sorted(names)
