"""Flower's ``flower-supernode`` with a shorter idle poll (``[connection] poll-interval``).

An idle SuperNode sleeps a hard-coded 3 s between two ``pull-messages`` requests, with no flag
or environment variable to change it, so a message waits 1.5 s on average before the site even
sees it (FLOWER.md, "Latency"); while a message is in work it sleeps 0.5 s between checks for
the ClientApp's reply and for its objects. This module runs Flower's own ``flower-supernode``
entry point in-process after capping the ``time.sleep`` that
``flwr.supernode.start_client_internal`` calls: sleeps of a second or more (the idle poll) at
``poll_s``, shorter ones (local checks, no network) at ``busy_s`` (0.05 s).

It also shortens Flower's back-off when an object of a message is not there yet
(:func:`shorten_pull_backoff`: 1 s doubling to 10 s -> 0.05 s doubling to 0.5 s): a message is
handed out before its arrays finished uploading, and the puller then sleeps a whole second or
more for an upload that takes milliseconds. :mod:`fedmed.flower.warmstart` does the same in
the site's ClientApp processes. Nothing else changes: same flags, same protocol, same process.

Uses Flower internals (``tests/flower/test_fastpoll.py`` and
``tests/flower/test_flower_contract.py`` fail if the module stops sleeping through its
module-level ``time``). Both are speed-ups (:mod:`fedmed.flower.speedups`: ``fastpoll``,
``backoff``): on a Flower that lacks what they patch they change nothing and warn once, and
``FEDMED_FLOWER_WITHOUT`` switches them off.

Example (what :func:`fedmed.client.supernode.supernode_command` runs)::

    python -m fedmed.flower.fastpoll --poll-interval 0.2 -- --superlink 127.0.0.1:9092 ...
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from fedmed.flower.speedups import drifted, enabled, import_for, source_of

__all__ = [
    "BUSY_S",
    "IDLE_SLEEP",
    "PULL_BACKOFF",
    "PULL_FUNCTIONS",
    "CappedSleep",
    "cap_supernode_sleep",
    "main",
    "shorten_pull_backoff",
]

SUPERNODE_MODULE = "flwr.supernode.start_client_internal"
INFLATABLE_MODULE = "flwr.supercore.inflatable.inflatable_utils"
BUSY_S = 0.05  # cap of the SuperNode's short (local) waits while a message is in work
PULL_BACKOFF = {"initial_backoff": 0.05, "backoff_cap": 0.5, "max_tries_per_object": 10_000}
PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")
IDLE_SLEEP = "time.sleep(3)"  # the idle wait in Flower's SuperNode loop that fastpoll caps


class CappedSleep:
    """Stands in for the ``time`` module: ``sleep(s)`` sleeps ``min(s, cap)`` for waits of a
    second or more, ``min(s, busy_cap)`` for shorter ones.

    Example:
        >>> CappedSleep(0.2).sleep(3)     # returns after 0.2 s
        >>> CappedSleep(0.2).sleep(0.5)   # returns after 0.05 s
    """

    def __init__(self, cap: float, busy_cap: float = BUSY_S) -> None:
        self.cap = cap
        self.busy_cap = busy_cap

    def sleep(self, seconds: float) -> None:
        """Sleep at most ``cap`` (long waits) or ``busy_cap`` (short waits) seconds."""
        time.sleep(min(seconds, self.cap if seconds >= 1 else self.busy_cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_supernode_sleep(poll_s: float, busy_s: float = BUSY_S) -> ModuleType | None:
    """Make Flower's SuperNode loop sleep at most ``poll_s`` s when idle and ``busy_s`` s in
    its short waits; return the patched module.

    Returns None (Flower's own sleeps, stock) when the speed-up ``fastpoll`` is switched off
    or Flower's loop no longer idles through its module-level ``time`` (one
    :class:`~fedmed.flower.speedups.FlowerDriftWarning`).

    Raises:
        ValueError: ``poll_s`` or ``busy_s`` out of range (a site config error).
    """
    if not 0 < poll_s <= 3:
        raise ValueError(f"poll interval {poll_s} must be in (0, 3] seconds")
    if not 0 < busy_s <= 0.5:
        raise ValueError(f"busy wait {busy_s} must be in (0, 0.5] seconds")
    if not enabled("fastpoll"):
        return None
    module = import_for("fastpoll", SUPERNODE_MODULE)
    if module is None:
        return None
    current = getattr(module, "time", None)
    if not (current is time or isinstance(current, CappedSleep)):
        drifted("fastpoll", f"{SUPERNODE_MODULE} has no module-level `time` to cap")
        return None
    if IDLE_SLEEP not in source_of(module):
        drifted("fastpoll", f"{SUPERNODE_MODULE} no longer idles with `{IDLE_SLEEP}`")
        return None
    module.time = CappedSleep(poll_s, busy_s)
    return module


def shorten_pull_backoff(**backoff: float) -> bool:
    """Make Flower's object pulls in this process retry an object that is not there yet after
    0.05 s (doubling to 0.5 s) instead of 1 s (doubling to 10 s), with as many tries as fit in
    Flower's overall ``max_time``; keyword arguments override :data:`PULL_BACKOFF`.

    Returns False, changing nothing (Flower's back-off, stock), when the speed-up ``backoff``
    is switched off or a pull function lacks these keyword defaults (one
    :class:`~fedmed.flower.speedups.FlowerDriftWarning`).
    """
    if not enabled("backoff"):
        return False
    values = {**PULL_BACKOFF, **backoff}
    module = import_for("backoff", INFLATABLE_MODULE)
    if module is None:
        return False
    found = []
    for name in PULL_FUNCTIONS:
        defaults = getattr(getattr(module, name, None), "__kwdefaults__", None) or {}
        if missing := sorted(set(values) - set(defaults)):
            drifted("backoff", f"{INFLATABLE_MODULE}.{name} has no keyword defaults {missing}")
            return False
        found.append(defaults)
    for defaults in found:  # all or nothing
        defaults.update(values)
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """``--poll-interval S [--] <flower-supernode flags>``: run the SuperNode."""
    parser = argparse.ArgumentParser(prog="python -m fedmed.flower.fastpoll")
    parser.add_argument("--poll-interval", type=float, required=True)
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if rest and rest[0] == "--":
        rest = rest[1:]
    cap_supernode_sleep(args.poll_interval)
    shorten_pull_backoff()
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
