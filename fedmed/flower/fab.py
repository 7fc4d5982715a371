"""Flower App Bundles (FABs): fedmed's shim app, zipped the way ``flwr build`` zips an app.

The app shipped to the sites (the FAB) is a thin shim built in memory: a ``pyproject.toml``
declaring every run-config key with its default (Flower refuses override keys the FAB does not
declare) and two modules that import the installed fedmed's apps, so every site runs the fedmed
it installed. It holds nothing per run: the run's values travel as Flower's
``override_config``, so the FAB's bytes (and sha256, which sites pin, see
:mod:`fedmed.flower.pinning`) depend only on the fedmed version, the defaults and the two
module names. The zip has fixed dates (``flwr.cli.build``), so the same files give the same
hash.

Uses Flower internals (``flwr.cli.build.build_fab_from_files``, ``flwr.supercore.fab.Fab``);
``tests/flower/test_flower_contract.py`` fails if they move.

Example:
    >>> fab = fab_from_files(shim_files({"num-rounds": 3}))
    >>> fab.hash_str == hashlib.sha256(fab.content).hexdigest()
    True
"""

from __future__ import annotations

import hashlib
import re
import threading
import warnings
from collections.abc import Mapping

with warnings.catch_warnings():
    # flwr.cli imports typer, which touches a click API deprecated since click 8.2.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="typer")
    from flwr.cli.build import build_fab_from_files
    from flwr.supercore.fab import Fab

from fedmed import __version__

__all__ = [
    "APP_NAME",
    "APP_PUBLISHER",
    "CLIENT_MODULE",
    "SERVER_MODULE",
    "Fab",
    "fab_from_files",
    "shim_files",
]

APP_NAME = "fedmed-app"
APP_PUBLISHER = "fedmed"
# The installed modules the shim imports its apps from (names only: nothing here imports them).
SERVER_MODULE = "fedmed.server.app"
CLIENT_MODULE = "fedmed.client.app"
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _shim(target: str) -> bytes:
    """``pkg.mod`` (attribute ``app``) or ``pkg.mod:attr`` -> a module re-exporting it as app."""
    module, _, attr = target.partition(":")
    attr = attr or "app"
    if not _MODULE.match(module) or not attr.isidentifier():
        raise ValueError(f"not a module[:attribute] name: {target!r}")
    alias = "" if attr == "app" else " as app"
    return f'from {module} import {attr}{alias}\n\n__all__ = ["app"]\n'.encode()


def _toml_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def shim_files(
    run_config: Mapping[str, str | int | float | bool],
    *,
    server_module: str = SERVER_MODULE,
    client_module: str = CLIENT_MODULE,
) -> dict[str, bytes]:
    """The shim app's files (relative path -> bytes) declaring ``run_config`` as defaults.

    ``server_module``/``client_module`` name installed modules exposing ``app`` (or
    ``module:attribute``). ``[tool.flwr.app.config]`` is the last table of the
    ``pyproject.toml``, so a caller may append keys to it.
    """
    config_lines = "\n".join(
        f'"{key}" = {_toml_value(run_config[key])}' for key in sorted(run_config)
    )
    pyproject = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "{__version__}"
description = "fedmed federated segmentation (shim: runs the fedmed installed at each site)"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "{APP_PUBLISHER}"

[tool.flwr.app.components]
serverapp = "fedmed_app.server_app:app"
clientapp = "fedmed_app.client_app:app"

[tool.flwr.app.config]
{config_lines}
"""
    return {
        "pyproject.toml": pyproject.encode(),
        "fedmed_app/__init__.py": b'"""fedmed Flower app shim."""\n',
        "fedmed_app/server_app.py": _shim(server_module),
        "fedmed_app/client_app.py": _shim(client_module),
    }


_BUILD_LOCK = threading.Lock()


def fab_from_files(files: Mapping[str, bytes]) -> Fab:
    """Zip app files (relative path -> bytes) into a FAB the way ``flwr build`` does."""
    # catch_warnings swaps the process-wide filter list: two threads inside it at once (two
    # sites started in one process) restore each other's filters mid-build
    with _BUILD_LOCK, warnings.catch_warnings():
        # flwr 1.41's build uses pathspec's "gitwildmatch", deprecated in pathspec 0.12.
        warnings.filterwarnings(
            "ignore", message=".*GitWildMatchPattern", category=DeprecationWarning
        )
        fab_bytes, _ = build_fab_from_files(dict(files))
    return Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
