"""The layers of DESIGN.md as an allow-list of unit -> unit imports, and the checker that enforces it.

A unit is a subpackage of the top package (``wan/engine``), or a top-level module, with the
``cli*.py`` modules grouped as ``cli``. Every ``import`` and ``from ... import`` is read with
``ast``, at module level and inside functions alike (lazy imports are still dependencies), and
relative imports are resolved. Dynamic imports by string (``importlib``) are not seen.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

# Neutral helpers at the bottom: anything may import them, they import no other unit.
BASE = {"fileio", "flags", "config"}
_LOW = {"models", "registry", "layers"} | BASE
_LOADING = {"loading", "testing", "wan"} | _LOW     # "wan": the public API in wan/__init__.py (loaders)
_MIDDLE = {"optim", "lora", "parallel"} | _LOADING

# unit -> units it may import (besides itself). Data walks one way:
# app/cli -> train -> engine -> optim / lora / parallel -> loading -> models.
ALLOWED: dict[str, set[str]] = {
    **{name: set() for name in BASE},
    "models": {"fileio"},
    "layers": set(),
    "registry": BASE,
    "testing": {"models", "layers"} | BASE,
    "loading": {"models", "registry", "layers", "testing"} | BASE,
    "wan": {"loading"},
    "optim": _LOADING,
    "lora": _LOADING,
    "parallel": _LOADING,
    "engine": _MIDDLE,
    "train": {"engine"} | _MIDDLE,
    "app": {"engine", "train"} | _MIDDLE,     # the UI imports nothing from the CLI modules
    "cli": {"app", "engine", "train"} | _MIDDLE,
}


@dataclass(frozen=True)
class Violation:
    file: Path
    line: int
    source: str
    target: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source} imports {self.target}, which its layer may not"


def unit_of(package: str, parts: list[str], root: Path) -> str | None:
    """The unit of dotted module ``parts`` (without the top package): a subpackage, a top-level
    module (``cli_*`` -> ``cli``), or ``wan`` for the top package itself."""
    if not parts:
        return package
    head = parts[0]
    if (root / head).is_dir():
        return head
    return "cli" if head == "cli" or head.startswith("cli_") else head


def _targets(node: ast.AST, package: str, here: list[str], root: Path) -> list[list[str]]:
    """Module paths (without the top package) an import node names inside ``package``; ``here``:
    the importing module's package path (without the top package)."""
    if isinstance(node, ast.Import):
        return [n.name.split(".")[1:] for n in node.names if n.name.split(".")[0] == package]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: from the importing module's package
        base = here[: len(here) - (node.level - 1)]
        mod = base + (node.module.split(".") if node.module else [])
    elif node.module and node.module.split(".")[0] == package:
        mod = node.module.split(".")[1:]
    else:
        return []
    if mod:
        return [mod]
    # "from wan import fileio": each name is a unit of its own, or the top package's API
    return [[a.name] if (root / a.name).is_dir() or (root / f"{a.name}.py").is_file() else [] for a in node.names]


def check_imports(root: Path, allowed: dict[str, set[str]] = ALLOWED) -> list[Violation]:
    """Every import in the package at ``root`` that its unit's allow-list does not permit; an
    unknown unit may import nothing."""
    package = root.name
    found: list[Violation] = []
    for path in sorted(root.rglob("*.py")):
        rel = list(path.relative_to(root).with_suffix("").parts)
        module = rel[:-1] if rel[-1] == "__init__" else rel
        source = unit_of(package, module, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            for target in _targets(node, package, rel[:-1], root):
                unit = unit_of(package, target, root)
                if unit != source and unit not in allowed.get(source, set()):
                    found.append(Violation(path, node.lineno, source, unit))
    return found
