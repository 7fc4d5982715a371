"""Layering: only ``fedmed/flower/`` touches Flower beyond its public app API, the site
(``client/``) never imports the central side (``server/``), and the library (``fedmed/``)
never imports the apps (``server/``, ``client/``, ``simulation/``) but through the console
entry points of ``fedmed/cli/main.py``.

A grep over the syntax tree of every module in ``fedmed/`` and the apps: imports
(also inside functions) and string constants that name a module (``importlib.import_module``,
``monkeypatch`` targets, ``-m`` commands). Docstrings and comments may mention anything.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fedmed", "server", "client", "simulation")
FLOWER_ROOM = ROOT / "fedmed" / "flower"
PUBLIC_FLOWER = ("flwr.app", "flwr.serverapp", "flwr.clientapp")
_FLWR_NAME = re.compile(r"\bflwr(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_SERVER_NAME = re.compile(r"\bfedmed\.server(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_APP_NAME = re.compile(r"\bfedmed\.(?:server|client|simulation)(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
# the console scripts fedmed-server, fedmed-client and fedmed-sim: the library's one way in
ENTRY_POINTS = ROOT / "fedmed" / "cli" / "main.py"

# Known edges, each with its reason; a stale entry fails the test (remove it then).
ALLOWED_CLIENT_TO_SERVER: set[tuple[str, str]] = set()


def _public_flower(name: str) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in PUBLIC_FLOWER)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module and its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        if isinstance(node, kinds) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def imported_and_named(source: str) -> Iterator[tuple[int, str, str]]:
    """(line, "import" | "string", module name) for every import and every module-like name in
    a non-docstring string constant of ``source``."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, "import", alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, "import", node.module
            for alias in node.names:  # `from flwr import common` imports flwr.common
                yield node.lineno, "import", f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in skip:
                continue
            for pattern in (_FLWR_NAME, _APP_NAME):
                for match in pattern.finditer(node.value):
                    yield node.lineno, "string", match.group()


def private_flower_uses(source: str) -> list[str]:
    """Flower beyond ``flwr.app``/``flwr.serverapp``/``flwr.clientapp`` in ``source``."""
    out = []
    for line, kind, name in imported_and_named(source):
        is_flower = name == "flwr" or name.startswith("flwr.")
        if is_flower and not _public_flower(name):
            out.append(f"line {line}: {kind} {name}")
    return out


def server_uses(source: str) -> set[str]:
    """The ``fedmed.server`` modules (``fedmed.server.x``) ``source`` imports or names."""
    return {
        ".".join(name.split(".")[:3])
        for _, _, name in imported_and_named(source)
        if _SERVER_NAME.fullmatch(name)
    }


def _modules() -> list[Path]:
    files = []
    for package in PACKAGES:
        files.extend(sorted((ROOT / package).rglob("*.py")))
    return [f for f in files if ".venv" not in f.parts]


def test_the_checker_sees_imports_and_module_strings_but_not_docstrings() -> None:
    source = '''"""Docstring about flwr.supernode.cli and fedmed.server.app."""
import flwr.common.constant
from flwr import common
from flwr.app import Message
from flwr.serverapp.strategy import FedAvg

def f():
    """flwr.proto is fine here."""
    import importlib
    importlib.import_module("flwr.supernode.runtime.run_clientapp")
    from fedmed.server.submit import build_fab
'''
    assert private_flower_uses(source) == [
        "line 2: import flwr.common.constant",
        "line 3: import flwr",
        "line 3: import flwr.common",
        "line 10: string flwr.supernode.runtime.run_clientapp",
    ]
    assert server_uses(source) == {"fedmed.server.submit"}


def test_only_fedmed_flower_touches_flower_beyond_its_app_api() -> None:
    offences = []
    for path in _modules():
        if FLOWER_ROOM in path.parents:
            continue
        for offence in private_flower_uses(path.read_text()):
            offences.append(f"{path.relative_to(ROOT)} {offence}")
    assert not offences, (
        "Flower internals outside fedmed/flower/ (move the use into a fedmed/flower module):\n"
        + "\n".join(offences)
    )


def test_client_does_not_import_server() -> None:
    edges = set()
    for path in sorted((ROOT / "client").rglob("*.py")):
        for name in server_uses(path.read_text()):
            edges.add((str(path.relative_to(ROOT)), name))
    assert edges - ALLOWED_CLIENT_TO_SERVER == set(), (
        "client/ imports server/ (shared code belongs in fedmed/, Flower process code in "
        f"fedmed/flower/): {sorted(edges - ALLOWED_CLIENT_TO_SERVER)}"
    )
    stale = ALLOWED_CLIENT_TO_SERVER - edges
    assert not stale, f"remove the stale allowed edges {sorted(stale)} from this test"


def test_every_flower_module_exports_what_it_defines() -> None:
    import importlib

    for path in sorted(FLOWER_ROOM.glob("*.py")):
        name = "fedmed.flower" if path.stem == "__init__" else f"fedmed.flower.{path.stem}"
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{name} declares no __all__"
        missing = [n for n in exported if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names {missing}, which it does not define"


def app_uses(source: str, *, kinds: tuple[str, ...] = ("import", "string")) -> set[str]:
    """The app packages (``fedmed.server``, ``fedmed.client``, ``fedmed.simulation``) that
    ``source`` imports or names (``kinds``)."""
    return {
        ".".join(name.split(".")[:2])
        for _, kind, name in imported_and_named(source)
        if kind in kinds and _APP_NAME.fullmatch(name)
    }


# Library modules that name the default app modules as values (the FAB's components, the
# federation config's server-app/client-app defaults); they never import them.
NAMES_THE_APPS = {ROOT / "fedmed" / "config.py", ROOT / "fedmed" / "flower" / "fab.py"}


def test_the_library_does_not_import_the_apps() -> None:
    offences = []
    for path in sorted((ROOT / "fedmed").rglob("*.py")):
        if path == ENTRY_POINTS:
            continue
        kinds = ("import",) if path in NAMES_THE_APPS else ("import", "string")
        for name in sorted(app_uses(path.read_text(), kinds=kinds)):
            offences.append(f"{path.relative_to(ROOT)} -> {name}")
    assert not offences, (
        "the library imports an app (move the shared code below the apps, into fedmed/):\n"
        + "\n".join(offences)
    )
    assert app_uses(ENTRY_POINTS.read_text()) == {
        "fedmed.server",
        "fedmed.client",
        "fedmed.simulation",
    }
    for path in NAMES_THE_APPS:  # a stale entry goes
        assert app_uses(path.read_text(), kinds=("string",)), f"{path} names no app: drop it"
