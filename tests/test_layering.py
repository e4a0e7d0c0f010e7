"""Import rules of the package layout, each checked in a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent)  # not the repo root: no accidental top-level imports
    return set(out.stdout.split())


def test_judges_never_import_problems():
    loaded = _modules_after_import("ppg.judges")
    assert not any(name == "ppg.problems" or name.startswith("ppg.problems.") for name in loaded)


@pytest.mark.parametrize("module", ["ppg.rollout", "ppg.models", "ppg.judges", "ppg.problems", "ppg.module",
                                    "ppg.data", "ppg.objective", "ppg.subsets"])
def test_library_does_not_import_commands(module):
    loaded = _modules_after_import(module)
    assert not any(name.startswith("ppg.commands") for name in loaded)


def test_math_is_pure_torch():
    loaded = _modules_after_import("ppg.objective")
    assert not {"lightning", "transformers", "peft"} & loaded


def test_callbacks_are_installed_under_ppg_only():
    loaded = _modules_after_import("ppg.callbacks.run_record")
    assert "ppg.callbacks.run_record" in loaded
    result = subprocess.run([sys.executable, "-c", "import callbacks"], capture_output=True, text=True, check=False,
                            cwd=ROOT.parent)
    assert "No module named 'callbacks'" in result.stderr


def _private_reads(path: Path) -> list[str]:
    """``x._name`` attribute reads where ``x`` is not ``self``/``cls`` (another object's privates)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


def test_callbacks_and_commands_read_no_private_attributes():
    files = [*(ROOT / "callbacks").glob("*.py"), *(ROOT / "ppg" / "commands").rglob("*.py"), ROOT / "ppg" / "cli.py"]
    reads = [hit for path in files for hit in _private_reads(path)]
    assert reads == []
