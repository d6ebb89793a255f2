"""The import graph keeps its layers: format/ is the base both halves share, quant/ (the offline quantizer) never
reaches the engine. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "slimquant"
# package -> the slimquant modules it may import (itself included)
ALLOWED = {
    "format": ("slimquant.format",),
    "quant": ("slimquant.format", "slimquant.quant", "slimquant.devices", "slimquant.stats"),  # stats: plain math
}


def imported_modules(file: Path) -> set[str]:
    """Every absolute module name the file imports, at any depth (from X import y counts X and X.y)."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{file}: relative import"
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def _allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    """Outside slimquant, the package itself, or one of prefixes (or a module under one)."""
    return not name.startswith("slimquant.") or any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package", ALLOWED)
def test_package_imports_only_its_layers(package):
    bad = {
        f"{file.relative_to(PACKAGE.parent)}: {name}"
        for file in sorted((PACKAGE / package).rglob("*.py"))
        for name in imported_modules(file)
        if not _allowed(name, ALLOWED[package])
    }
    assert not bad, f"slimquant/{package} reaches past its layers:\n" + "\n".join(sorted(bad))


def test_the_check_sees_imports_inside_functions(tmp_path):
    file = tmp_path / "m.py"
    file.write_text("def f():\n    from slimquant.evaluation import evaluate\n")
    assert "slimquant.evaluation" in imported_modules(file)
