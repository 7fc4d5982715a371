"""pyproject's explicit package list covers every package folder in the repo."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"server": "fedmed.server", "client": "fedmed.client", "simulation": "fedmed.simulation"}


def _package_folders() -> set[str]:
    names = set()
    inits = [p for top in ("fedmed", *MAPPED) for p in (ROOT / top).glob("**/__init__.py")]
    for init in inits:
        rel = init.parent.relative_to(ROOT)
        top = rel.parts[0]
        if top == "fedmed":
            names.add(".".join(rel.parts))
        elif top in MAPPED:
            names.add(".".join((MAPPED[top], *rel.parts[1:])))
    return names


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    assert _package_folders() == listed


def test_the_app_folders_install_under_fedmed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["package-dir"] == {"fedmed": "fedmed"} | {
        package: folder for folder, package in MAPPED.items()
    }


def test_test_module_basenames_are_unique() -> None:
    # pytest's default (prepend) import mode imports test files by basename.
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert duplicates == [], f"rename these test modules to unique names: {duplicates}"
