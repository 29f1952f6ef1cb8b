"""The layering of DESIGN.md holds: every import of the project is allowed by ``import_rules.ALLOWED``,
and the checker does catch a bad import (planted in a tiny fake package, not in the project)."""

from pathlib import Path

from import_rules import ALLOWED, check_imports

ROOT = Path(__file__).resolve().parent.parent


def test_the_project_follows_its_import_rules():
    violations = check_imports(ROOT / "wan")
    assert not violations, "\n".join(map(str, violations))


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "wan"
    for name, text in {"__init__.py": "", "models/__init__.py": "", "engine/__init__.py": "",
                       "optim/__init__.py": "", "optim/step.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_planted_bad_import_is_named_with_file_and_line(tmp_path):
    root = _fake_package(tmp_path, {
        "models/dit.py": "import torch\n\n\ndef f():\n    from wan.engine import loop  # a network reaching up\n",
        "optim/cache.py": "from ..engine import loop\n",          # relative, at module level
        "engine/loop.py": "from wan.optim import step\nimport wan.models.dit\n",  # allowed: downwards
    })
    found = sorted(map(str, check_imports(root, ALLOWED)))
    assert found == [f"{root / 'models/dit.py'}:5: models imports engine, which its layer may not",
                     f"{root / 'optim/cache.py'}:1: optim imports engine, which its layer may not"]


def test_top_level_names_and_cli_modules_are_units(tmp_path):
    root = _fake_package(tmp_path, {
        "fileio.py": "", "cli_lora.py": "from wan.engine import x\n",
        "app/__init__.py": "", "app/ui.py": "from wan import fileio\nfrom wan.cli_lora import shapes\n",
    })
    found = [str(v) for v in check_imports(root, ALLOWED)]
    assert found == [f"{root / 'app/ui.py'}:2: app imports cli, which its layer may not"]
