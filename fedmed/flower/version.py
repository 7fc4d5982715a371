"""The Flower versions fedmed is tested with, checked when a fedmed process starts.

fedmed builds on Flower internals (:mod:`fedmed.flower`); ``tests/flower/test_flower_contract.py``
asserts every one of them on each version in :data:`SUPPORTED_SERIES`. On any other version a
security control could silently stop working (app pinning, the public port filter), so
``fedmed-server``, ``fedmed-client``, ``fedmed-sim``, the server app and each site's
``flwr-clientapp`` refuse to start there (:func:`check_flower_version`).

Example:
    >>> check_flower_version()              # the installed flwr, e.g. "1.41.0"
    '1.41.0'
    >>> check_flower_version("1.43.0")
    Traceback (most recent call last):
    fedmed.errors.FederationError: flwr 1.43.0 is installed but fedmed supports flwr 1.41.x or ...
"""

from __future__ import annotations

import re
from importlib import metadata

from fedmed.errors import FederationError

__all__ = ["SUPPORTED_SERIES", "check_flower_version", "installed_flower_version", "supported"]

# Each "MAJOR.MINOR" series whose releases pass tests/flower/test_flower_contract.py and the unit
# tests (README, "Flower versions"); add one only after running them on it. The first is the
# series pyproject.toml installs. 1.42: 1.42.0 passed both (the e2e tests ran on 1.41).
SUPPORTED_SERIES: tuple[str, ...] = ("1.41", "1.42")
_RELEASE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def installed_flower_version() -> str:
    """The version of the installed ``flwr`` distribution.

    Raises:
        FederationError: flwr is not installed.
    """
    try:
        return metadata.version("flwr")
    except metadata.PackageNotFoundError as err:
        raise FederationError(
            "flwr is not installed: reinstall fedmed (`pip install -e .`), which pins "
            f"flwr {_supported_text()}"
        ) from err


def supported(version: str) -> bool:
    """Whether ``version`` is a final release of a tested series (no pre-release, no dev)."""
    match = _RELEASE.match(version)
    return match is not None and f"{match[1]}.{match[2]}" in SUPPORTED_SERIES


def check_flower_version(version: str | None = None) -> str:
    """Return the installed flwr version (or ``version``) if fedmed is tested with it.

    Raises:
        FederationError: outside :data:`SUPPORTED_SERIES`; the message names both versions.
    """
    version = installed_flower_version() if version is None else version
    if not supported(version):
        raise FederationError(
            f"flwr {version} is installed but fedmed supports flwr {_supported_text()} only: "
            "its security controls (app pinning at sites, the SuperLink's public port filter) "
            "rely on Flower internals checked for those versions. Install the flwr fedmed "
            f"installs (`pip install 'flwr[simulation]=={SUPPORTED_SERIES[0]}.*'`)"
        )
    return version


def _supported_text() -> str:
    return " or ".join(f"{series}.x" for series in SUPPORTED_SERIES)
