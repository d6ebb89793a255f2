"""No module of the repository hides an installed distribution from the code under test.

transformers >= 5.25 imports the `kernels` distribution at model load; a test folder on sys.path named
`kernels` once shadowed it and failed 178 tests on a fresh machine.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"slimquant"}


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _inside_repo(path: Path) -> bool:
    """In the repository's own tree, not in an environment kept inside it (.venv)."""
    env = Path(sys.prefix).resolve()
    return _inside(path, REPO) and not _inside(path, env)


def _module_names(folder: Path) -> set[str]:
    """Top-level names that `import` finds in folder: packages, modules and namespace folders."""
    names = set()
    for child in folder.iterdir():
        if child.suffix == ".py":
            names.add(child.stem)
        elif child.is_dir() and child.name.isidentifier():
            names.add(child.name)
    return names


def _installed_names() -> dict[str, list[str]]:
    """{top-level import name: distributions} of what is installed, without this project."""
    return {name: dists for name, dists in packages_distributions().items() if not set(dists) & OURS}


def test_no_name_on_sys_path_shadows_an_installed_distribution():
    repo_dirs = {Path(p or ".").resolve() for p in sys.path}
    repo_dirs = {p for p in repo_dirs if p.is_dir() and _inside_repo(p)}
    assert repo_dirs, "pytest puts the repository root on sys.path (tests/ is a package)"
    installed = _installed_names()
    clashes = {n: installed[n] for d in repo_dirs for n in _module_names(d) if n in installed}
    assert not clashes, f"repository names that hide installed distributions: {clashes}"


def test_no_test_folder_is_named_like_an_installed_distribution():
    installed = _installed_names()
    folders = [d for d in (REPO / "tests").rglob("*") if d.is_dir() and d.name != "__pycache__"]
    clashes = {str(d.relative_to(REPO)): installed[d.name] for d in folders if d.name in installed}
    assert not clashes, f"rename these test folders: {clashes}"


def test_every_test_folder_is_a_package():
    """Without __init__.py, pytest puts the folder itself on sys.path and its children become top-level names."""
    folders = [REPO / "tests", *(d for d in (REPO / "tests").rglob("*") if d.is_dir() and d.name != "__pycache__")]
    missing = [str(d.relative_to(REPO)) for d in folders if not (d / "__init__.py").is_file()]
    assert not missing, f"add __init__.py to {missing}"


def test_import_kernels_gets_the_installed_library():
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("the `kernels` distribution is not installed (transformers < 5.25 does not need it)")
    import kernels

    assert not _inside_repo(Path(kernels.__file__).resolve().parent), kernels.__file__
    assert "kernels" in packages_distributions().get("kernels", [])
