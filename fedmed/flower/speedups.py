"""fedmed's latency speed-ups to Flower: which are on, and how each switches off.

Each speed-up patches a Flower internal to cut the time a message waits. None is needed for a
run to work, so unlike the security controls (app pinning, the public port filter: they fail
closed) each one checks, before it patches, that the installed Flower still has what it patches;
when it does not, it changes nothing, emits one :class:`FlowerDriftWarning` (the speed-up, what
is missing and the flwr version) and Flower's stock behaviour applies.

:data:`WITHOUT_ENV` (``FEDMED_FLOWER_WITHOUT``) switches speed-ups off on request, e.g.
``FEDMED_FLOWER_WITHOUT=fastpoll,warmstart`` or ``all`` (stock Flower): every fedmed Flower
process reads it (they inherit it from ``fedmed-server`` / ``fedmed-client``), so set it for
both. ``bench/federation.py --without`` measures what each one earns.

Example:
    >>> enabled("fastpoll")
    True
    >>> os.environ[WITHOUT_ENV] = "fastpoll"; enabled("fastpoll")
    False
    >>> drifted("backoff", "flwr...inflatable_utils.pull_objects has no backoff_cap")
    FlowerDriftWarning: fedmed speed-up 'backoff' is off: ... (flwr 1.43.0) ...
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import warnings
from collections.abc import Mapping
from types import ModuleType

from fedmed.errors import ConfigError, FederationError

__all__ = [
    "SPEEDUPS",
    "WITHOUT_ENV",
    "FlowerDriftWarning",
    "drifted",
    "enabled",
    "import_for",
    "off",
    "source_of",
    "switched_off",
]

log = logging.getLogger(__name__)

WITHOUT_ENV = "FEDMED_FLOWER_WITHOUT"
# name -> (what fedmed does, Flower's stock behaviour when it is off)
SPEEDUPS: dict[str, tuple[str, str]] = {
    "fastpoll": (
        "the idle SuperNode polls every [connection] poll-interval s, short waits 0.05 s",
        "idle poll 3 s, short waits 0.5 s",
    ),
    "backoff": (
        "an object not uploaded yet is pulled again after 0.05 s, doubling to 0.5 s",
        "1 s doubling to 10 s",
    ),
    "warmstart": (
        "each message's flwr-clientapp is forked from a preloaded server",
        "a fresh flwr-clientapp process per message",
    ),
    "heartbeat": (
        "the SuperNode heartbeats every [connection] heartbeat-interval s",
        "30 s: a dead site is noticed after up to 60 s",
    ),
    "sqlite-timeout": (
        "the SuperLink waits 60 s for SQLite's write lock",
        "5 s, then HTTP 500 'database is locked'",
    ),
}

# This process's speed-ups found drifted, with what is missing (warned once each).
_OFF: dict[str, str] = {}
_LOGGED: set[str] = set()  # switched off on request, logged once each


class FlowerDriftWarning(UserWarning):
    """The installed Flower does not match what a fedmed speed-up patches: it is off."""


def switched_off(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The speed-ups :data:`WITHOUT_ENV` switches off (``all``: every one).

    Raises:
        ConfigError: a name that is not in :data:`SPEEDUPS`.
    """
    value = (os.environ if environ is None else environ).get(WITHOUT_ENV, "")
    names = {n.strip() for n in value.split(",") if n.strip()}
    if "all" in names:
        return frozenset(SPEEDUPS)
    if unknown := names - set(SPEEDUPS):
        raise ConfigError(
            f"{WITHOUT_ENV}={value!r} names {sorted(unknown)}: use 'all' or a comma-separated "
            f"list of {', '.join(SPEEDUPS)}"
        )
    return frozenset(names)


def enabled(name: str) -> bool:
    """Whether speed-up ``name`` may be applied in this process: not switched off by
    :data:`WITHOUT_ENV` (read at each call), not found drifted earlier (:func:`drifted`)."""
    if name not in SPEEDUPS:
        raise ValueError(f"unknown speed-up {name!r}: one of {', '.join(SPEEDUPS)}")
    if name in _OFF:
        return False
    if name in switched_off():
        if name not in _LOGGED:
            _LOGGED.add(name)
            log.info("fedmed speed-up %r switched off by %s: %s", name, WITHOUT_ENV,
                     SPEEDUPS[name][1])  # fmt: skip
        return False
    return True


def drifted(name: str, missing: str) -> None:
    """Switch speed-up ``name`` off in this process because the installed Flower lacks
    ``missing``: one :class:`FlowerDriftWarning` naming both and the flwr version."""
    if name in _OFF:
        return
    from fedmed.flower.version import installed_flower_version

    try:
        version = installed_flower_version()
    except FederationError:  # flwr not installed: still say what is off
        version = "unknown"
    _OFF[name] = missing
    warnings.warn(
        f"fedmed speed-up {name!r} is off: {missing} (flwr {version}); Flower's stock "
        f"behaviour applies ({SPEEDUPS[name][1]}). Runs work, only slower; "
        "tests/flower/test_flower_contract.py names what changed",
        FlowerDriftWarning,
        stacklevel=3,
    )


def import_for(name: str, module: str) -> ModuleType | None:
    """Flower's ``module``, which speed-up ``name`` patches; None, with the speed-up switched
    off (:func:`drifted`), when this Flower has no such module."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        drifted(name, f"{module} cannot be imported ({err})")
        return None


def off() -> dict[str, str]:
    """This process's speed-ups that are off, with why (drift, or :data:`WITHOUT_ENV`)."""
    requested = {name: f"switched off by {WITHOUT_ENV}" for name in switched_off()}
    return {**requested, **_OFF}


def source_of(obj: object) -> str:
    """The Python source of a Flower module or function ('' when unreadable: a speed-up that
    checks Flower's code for what it patches then finds nothing and stays off)."""
    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""
