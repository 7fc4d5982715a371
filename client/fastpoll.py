"""Flower's ``flower-supernode`` with a shorter idle poll (``[connection] poll-interval``).

An idle SuperNode sleeps a hard-coded 3 s between two ``pull-messages`` requests (and 0.5 s
while it waits for a reply to push), with no flag or environment variable to change it, so a
message waits 1.5 s on average before the site even sees it (FLOWER.md, "Latency"). This
module runs Flower's own ``flower-supernode`` entry point in-process after capping the
``time.sleep`` that ``flwr.supernode.start_client_internal`` calls at ``poll_s`` seconds.
Nothing else changes: same flags, same protocol, same process.

Uses a Flower internal (flwr pinned to 1.41; ``tests/client/test_fastpoll.py`` fails if the
module stops sleeping through its module-level ``time``).

Example (what :func:`fedmed.client.supernode.supernode_command` runs)::

    python -m fedmed.client.fastpoll --poll-interval 0.2 -- --superlink 127.0.0.1:9092 ...
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = ["CappedSleep", "cap_supernode_sleep", "main"]

SUPERNODE_MODULE = "flwr.supernode.start_client_internal"


class CappedSleep:
    """Stands in for the ``time`` module: ``sleep(s)`` sleeps ``min(s, cap)``.

    Example:
        >>> CappedSleep(0.2).sleep(3)   # returns after 0.2 s
    """

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        """Sleep at most ``cap`` seconds."""
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_supernode_sleep(poll_s: float) -> ModuleType:
    """Make Flower's SuperNode loop sleep at most ``poll_s`` s; return the patched module."""
    if not 0 < poll_s <= 3:
        raise ValueError(f"poll interval {poll_s} must be in (0, 3] seconds")
    module = importlib.import_module(SUPERNODE_MODULE)
    if not isinstance(module.time, (ModuleType, CappedSleep)):
        raise RuntimeError(f"{SUPERNODE_MODULE}.time is not the time module: flwr moved")
    module.time = CappedSleep(poll_s)
    return module


def main(argv: Sequence[str] | None = None) -> None:
    """``--poll-interval S [--] <flower-supernode flags>``: run the SuperNode."""
    parser = argparse.ArgumentParser(prog="python -m fedmed.client.fastpoll")
    parser.add_argument("--poll-interval", type=float, required=True)
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if rest and rest[0] == "--":
        rest = rest[1:]
    cap_supernode_sleep(args.poll_interval)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
