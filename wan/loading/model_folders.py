"""Model folders a user already has: ComfyUI's ``models/`` tree, Wan2GP's ``ckpts/``, the Hugging
Face cache, or any flat folder, scanned for Wan files identified by their tensors
(:func:`wan.loading.identify.identify`; folder names are only hints).

``scan_folder(folders, cache=...)`` follows symlinks without looping, lists a file that fails to
identify with its reason and goes on, and keeps a cache keyed by path, size and mtime so that a
second scan costs a stat per file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from wan.fileio import write_text_atomic
from wan.loading.identify import INDEX_SUFFIX, WEIGHT_SUFFIXES, Identity, identify

CACHE_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Scanning folders

# Folder name -> the role a file placed there is meant for (a hint only: files are identified by
# their tensors). ComfyUI's clip/ holds text encoders; clip_vision/ the image tower.
FOLDER_HINTS = {
    "diffusion_models": "dit", "unet": "dit", "vae": "vae", "text_encoders": "text_encoder",
    "clip": "text_encoder", "clip_vision": "clip", "loras": "lora", "ckpts": "wan2gp",
}
_HF_REPO = re.compile(r"^models--([^/]+?)--(.+)$")


@dataclass(frozen=True)
class Found:
    """One scanned file.

    Attributes:
        path: the file as found under the scanned folder (an index json for a sharded model).
        identity: what its tensors say it is.
        hint: the role its folder suggests ("dit", "vae", "text_encoder", "clip", "lora", "wan2gp") or None.
        repo: the Hugging Face repo id when it sits in a hub cache (``models--owner--name``).
        cached: the identity came from the cache.
    """

    path: Path
    identity: Identity
    hint: str | None = None
    repo: str | None = None
    cached: bool = False

    @property
    def misplaced(self) -> bool:
        """The folder suggests one Wan kind, the tensors say another (a DiT in ``vae/``). Files of
        other families are never "misplaced": a Flux DiT belongs in ``diffusion_models/`` too."""
        wan_kinds = ("dit", "vae", "text_encoder", "clip", "lora")
        return self.hint in wan_kinds and self.identity.kind in wan_kinds and self.identity.kind != self.hint


def folder_hints(path: Path) -> tuple[str | None, str | None]:
    """(role hint, Hugging Face repo id) from the folder names above ``path``."""
    hint = repo = None
    for part in reversed(path.parent.parts):
        if hint is None and part in FOLDER_HINTS:
            hint = FOLDER_HINTS[part]
        m = _HF_REPO.match(part)
        if m and repo is None:
            repo = f"{m.group(1)}/{m.group(2)}"
    return hint, repo


def scan_folder(folders: str | os.PathLike | Iterable[str | os.PathLike],
                cache: str | os.PathLike | None = None) -> list[Found]:
    """Identifies every weight file under ``folders`` (symbolic links followed, each real file and
    folder visited once, hidden folders skipped).

    Shards listed by an ``*.index.json`` are identified once, through the index. A file that fails
    is listed as ``unreadable`` with its reason; nothing stops the scan.

    Args:
        folders: one folder or several (a file is accepted too).
        cache: a JSON file of earlier identities keyed by (real path, size, mtime_ns); read if it
            exists, rewritten (atomically) when something changed.
    """
    roots = [Path(folders)] if isinstance(folders, (str, os.PathLike)) else [Path(f) for f in folders]
    cache_path = Path(cache) if cache is not None else None
    old = _read_cache(cache_path)
    new: dict[str, dict] = {}
    found: list[Found] = []
    for path in _walk(roots):
        real = os.path.realpath(path)
        deps = _stats([real] + _shards_of(path))
        entry = old.get(real)
        hint, repo = folder_hints(path)
        if entry is not None and entry.get("deps") == deps:
            try:
                identity, cached = Identity.from_dict(entry["identity"]), True
            except (TypeError, KeyError, ValueError):
                identity, cached = identify(path), False
        else:
            identity, cached = identify(path), False
        new[real] = {"deps": deps, "identity": identity.to_dict()}
        found.append(Found(path, identity, hint, repo, cached))
    if cache_path is not None:
        scanned = [os.path.realpath(r) + os.sep for r in roots]
        merged = {k: v for k, v in old.items() if not any((k + os.sep).startswith(s) for s in scanned)}
        merged.update(new)
        if merged != old:
            write_text_atomic(cache_path, json.dumps({"version": CACHE_VERSION, "entries": merged}))
    return found


def _walk(roots: list[Path]) -> Iterable[Path]:
    """Weight files and index jsons under ``roots``, each real file once; shards of an index are
    left out (the index stands for them)."""
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()
    stack = list(reversed(roots))
    while stack:
        folder = stack.pop()
        if folder.is_file():
            real = os.path.realpath(folder)
            if real not in seen_files and _wanted(folder.name):
                seen_files.add(real)
                yield folder
            continue
        real_dir = os.path.realpath(folder)
        if real_dir in seen_dirs:
            continue
        seen_dirs.add(real_dir)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        files, subdirs = [], []
        for e in entries:
            try:
                if e.is_dir():  # follows links
                    if not e.name.startswith("."):
                        subdirs.append(Path(e.path))
                elif e.is_file() and _wanted(e.name):
                    files.append(Path(e.path))
            except OSError:
                continue
        shards = set()
        for f in files:
            if f.name.endswith(INDEX_SUFFIX):
                shards.update(os.path.realpath(s) for s in _shards_of(f))
        for f in files:
            real = os.path.realpath(f)
            if real in seen_files or real in shards:
                continue
            seen_files.add(real)
            yield f
        stack.extend(reversed(subdirs))


def _wanted(name: str) -> bool:
    return name.endswith(INDEX_SUFFIX) or Path(name).suffix in WEIGHT_SUFFIXES


def _shards_of(path: Path) -> list[str]:
    """The shard files an index json names (nothing for other files or a broken index)."""
    if not path.name.endswith(INDEX_SUFFIX):
        return []
    try:
        weight_map = json.loads(path.read_text()).get("weight_map")
        return [str(path.parent / n) for n in sorted(set(weight_map.values())) if isinstance(n, str)]
    except (OSError, ValueError, AttributeError):
        return []


def _stats(paths: list[str]) -> list:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([p, st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else [p, None, None])
        except OSError:
            out.append([p, None, None])
    return out


def _read_cache(path: Path | None) -> dict[str, dict]:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged cache is rebuilt
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


__all__ = ["Found", "folder_hints", "scan_folder"]


# ---------------------------------------------------------------------------------------------
# Files found for a registry model


# Base width of the public VAEs (Wan 2.1: 96, Wan 2.2: 160): a VAE of another width is no stand-in
# for a real model's (the registry's specs state the version, not the width).
PUBLIC_VAE_DIMS = {"2.1": 96, "2.2": 160}


def _precision_rank(identity: Identity) -> int:
    """Prefer full precision over fp8 when a folder holds both (the profile may quantise itself)."""
    return {"fp32": 0, "bf16": 0, "fp16": 1, "fp8_scaled": 2, "fp8_e4m3fn": 3, "fp8_e5m2": 3}.get(
        identity.precision or "", 4)


def components_found(spec, found: list[Found], registry) -> dict[str, str]:
    """Role -> a file among ``found`` that can serve that component of model ``spec``, matched by what
    the file is, never by its name, except to tell the two experts of a Wan 2.2 A14B pair apart
    (their shapes are the same; ComfyUI and Wan2GP name them ``...high_noise...`` / ``...low_noise...``).

    The DiT(s) fit the spec's architecture; the VAE is of its version; the umT5 has the DiT's text
    width; the CLIP tower has its image width. The tokenizer is never found here (ComfyUI keeps it
    inside its own code): it comes from the registry, a small download.
    """
    from wan.loading.identify import Match, registry_matches
    usable = [f for f in found if f.identity.kind in ("dit", "vae", "text_encoder", "clip")]
    usable.sort(key=lambda f: (_precision_rank(f.identity), str(f.path)))
    out: dict[str, str] = {}
    for role in spec.transformer_roles:
        fits = [f for f in usable if f.identity.kind == "dit" and Match(spec.id, role) in registry_matches(
            f.identity, registry)]
        if spec.is_two_expert:
            side = "high" if role.endswith("high_noise") else "low"
            fits = [f for f in fits if f"{side}_noise" in f.path.name.lower() or f"{side}noise" in f.path.name.lower()]
        if fits:
            out[role] = str(fits[0].path)
    rules = {"vae": lambda i: i.kind == "vae" and i.version == spec.vae.version
             and (spec.test_model or i.dim == PUBLIC_VAE_DIMS.get(i.version)),
             "text_encoder": lambda i: i.kind == "text_encoder" and i.dim == spec.arch.text_dim}
    if spec.needs_clip:
        image_dim = spec.dit_config().get("image_dim")
        rules["clip"] = lambda i: i.kind == "clip" and i.dim == image_dim
    for role, fits in rules.items():
        match = next((f for f in usable if fits(f.identity)), None)
        if match is not None and role in spec.files:
            out[role] = str(match.path)
    return out
