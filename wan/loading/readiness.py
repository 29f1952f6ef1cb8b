"""Whether a registry model can run on this machine without a download, and from which files.

For each component (role) of a model: a file found in the user's model folders
(:func:`wan.loading.model_folders.components_found`), else the registry's file present in the
checkpoints folder, else generated on first use (the TEST family), else missing, with its size.
``wgp.py models`` and the web app's model picker show this; a job for a model that is not ready is
refused before anything loads, with the files to fetch and where they may be put.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from wan.loading.download import plan_files


@dataclass(frozen=True)
class Component:
    """One component of a model on this machine."""

    role: str
    source: str              # "found" (a models folder), "checkpoints", "generated" or "missing"
    path: str | None = None  # where it is (found or present); where it would go (missing)
    missing_bytes: int = 0   # bytes still to download (0 when unknown or present)
    estimated: bool = False  # missing_bytes is an estimate from the architecture


@dataclass(frozen=True)
class Readiness:
    model_id: str
    components: tuple[Component, ...]

    @property
    def ready(self) -> bool:
        return all(c.source != "missing" for c in self.components)

    @property
    def missing(self) -> tuple[Component, ...]:
        return tuple(c for c in self.components if c.source == "missing")

    @property
    def missing_bytes(self) -> int:
        return sum(c.missing_bytes for c in self.missing)

    def refusal(self, model_id: str, ways: str = "") -> str:
        """Why a job for this model cannot run here, and what to do: each missing file with where it
        goes and its size, then the ways to get them (``ways``: one more, said first, e.g. a button)."""
        lines = [f"{model_id} is not ready on this machine; missing:"]
        for c in self.missing:
            size = f" ({'~' if c.estimated else ''}{_gb(c.missing_bytes)})" if c.missing_bytes else ""
            lines.append(f"- {c.role}{size}: {c.path}")
        lines.append(f"Get them with {ways + ', or with ' if ways else ''}python wgp.py download {model_id}; or put "
                     "the files in a models folder (--models_dir), where they are recognised by their tensors.")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: ``ready`` or ``missing transformer (2.8 GB), vae (0.5 GB)``."""
        if self.ready:
            found = [c.role for c in self.components if c.source == "found"]
            return "ready" + (f" (from your folders: {', '.join(found)})" if found else "")
        return "missing " + ", ".join(
            f"{c.role} ({'~' if c.estimated else ''}{_gb(c.missing_bytes)})" if c.missing_bytes else c.role
            for c in self.missing)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def readiness(spec, checkpoint_dir: str | os.PathLike, found_files: Mapping[str, str] | None = None,
              variant: str = "bf16", estimates: Mapping[str, int] | None = None) -> Readiness:
    """The state of each component of ``spec``; ``found_files`` is role -> file from the user's
    folders (``components_found``). Reads no weights: a stat per planned file. ``estimates``: role ->
    the expected bytes of a missing file whose size the registry does not state (from the architecture:
    ``wan.optim.planner.file_size_estimates``), shown with a ``~``."""
    found_files = found_files or {}
    estimates = estimates or {}
    variant = "fp32" if spec.test_model else variant
    by_role: dict[str, list] = {}
    for planned in plan_files(spec, checkpoint_dir, variant):
        by_role.setdefault(planned.role, []).append(planned)
    out = []
    for role in spec.files:
        if role in found_files:
            out.append(Component(role, "found", found_files[role]))
            continue
        planned = by_role.get(role, [])
        if planned and all(p.is_present() for p in planned):
            out.append(Component(role, "checkpoints", str(planned[0].local_path)))
        elif planned and all(p.generator for p in planned):
            out.append(Component(role, "generated", str(planned[0].local_path)))
        else:
            todo = [p for p in planned if not p.is_present()]
            size = sum(p.size or 0 for p in todo)
            estimated = not size and role in estimates
            out.append(Component(role, "missing", str(todo[0].local_path) if todo else None,
                                 estimates[role] if estimated else size, estimated))
    return Readiness(spec.id, tuple(out))
