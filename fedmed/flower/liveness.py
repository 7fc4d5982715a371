"""The SuperNode process's liveness: its heartbeat interval, and an exit when it stops working.

**Heartbeat interval.** A Flower SuperNode tells the SuperLink how often it sends heartbeats
(Flower: every 17.5-22.5 s, declaring a hard-coded 30 s interval); the SuperLink counts it gone
after 2 x that interval without one. Only then does a crashed site's in-flight message come
back as "Node Unavailable" and may a restarted site (or a site reconnecting to a restarted
server) join again: up to 60 s. :func:`set_heartbeat_interval` makes this process declare
``[connection] heartbeat-interval`` seconds instead (and send accordingly), within the bounds
the SuperLink accepts (10-1800 s): at 10 s a dead site is noticed after 16-20 s.

**Liveness guard.** Flower's SuperNode can stay alive without working: an HTTP 500 from the
SuperLink (e.g. "database is locked" on a loaded machine) ends its pull loop (Flower logs the
error and returns) while its Runtime API thread keeps the process running, and the same answer
to a heartbeat ends the heartbeat thread, so the SuperLink soon counts the site gone although
the process still pulls. :func:`main` turns both into an exit with :data:`EXIT_STOPPED_WORKING`
and a log line starting with :data:`GUARD_PREFIX`, so :class:`fedmed.client.supernode.SiteNode`
restarts the SuperNode with its backoff.

Uses Flower internals (module-level heartbeat constants; ``tests/client/test_liveness.py`` and
``tests/flower/test_flower_contract.py`` fail if they move). The interval is a speed-up
(:mod:`fedmed.flower.speedups`, ``heartbeat``): where the constants moved it stays Flower's
30 s with one warning; the liveness guard uses no Flower internal.

Example (what :func:`fedmed.client.supernode.supernode_command` runs)::

    python -m fedmed.flower.liveness --heartbeat-interval 10 --poll-interval 0.5 -- \\
        --superlink 127.0.0.1:9092 ...          # flower-supernode flags
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import ModuleType

from fedmed.flower.speedups import drifted, enabled, import_for

__all__ = [
    "EXIT_STOPPED_WORKING",
    "GUARD_PREFIX",
    "HEARTBEAT_MODULES",
    "MAX_HEARTBEAT_S",
    "MIN_HEARTBEAT_S",
    "install_thread_guard",
    "main",
    "set_heartbeat_interval",
]

log = logging.getLogger(__name__)

# Where the SuperNode reads its heartbeat interval: the Fleet connection declares it to the
# SuperLink, the heartbeat sender derives its period from it ((interval - 5 s) x 0.7-0.9).
HEARTBEAT_MODULES = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")
# The SuperLink refuses activation and heartbeats declaring an interval outside these bounds
# (flwr.common.constant.HEARTBEAT_MIN_INTERVAL / HEARTBEAT_MAX_INTERVAL).
MIN_HEARTBEAT_S = 10.0
MAX_HEARTBEAT_S = 1800.0
EXIT_STOPPED_WORKING = 75  # EX_TEMPFAIL: try again
GUARD_PREFIX = "fedmed liveness: SuperNode stopped working:"
_EXIT_GRACE_S = 30.0


def set_heartbeat_interval(seconds: float) -> list[ModuleType]:
    """Make this process's SuperNode declare (and send heartbeats for) ``seconds``.

    Returns the patched Flower modules: none (Flower's 30 s, stock) when the speed-up
    ``heartbeat`` is switched off or a heartbeat constant moved (one
    :class:`~fedmed.flower.speedups.FlowerDriftWarning`; all or nothing).

    Raises:
        ValueError: ``seconds`` is outside what the SuperLink accepts.
    """
    if not MIN_HEARTBEAT_S <= seconds <= MAX_HEARTBEAT_S:
        raise ValueError(
            f"heartbeat interval {seconds} s must be within [{MIN_HEARTBEAT_S:g}, "
            f"{MAX_HEARTBEAT_S:g}] s (the SuperLink refuses other values)"
        )
    if not enabled("heartbeat"):
        return []
    modules = []
    for name in HEARTBEAT_MODULES:
        module = import_for("heartbeat", name)
        if module is None:
            return []
        if not isinstance(getattr(module, "HEARTBEAT_DEFAULT_INTERVAL", None), (int, float)):
            drifted("heartbeat", f"{name} has no HEARTBEAT_DEFAULT_INTERVAL")
            return []
        modules.append(module)
    for module in modules:
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds
    return modules


class _Guard:
    """What :func:`install_thread_guard` saw: the first thread that died, if any."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.lock = threading.Lock()


_guard = _Guard()


def _stop(reason: str) -> None:
    """Log ``reason`` and SIGTERM this process, once; not once Flower is already exiting."""
    with _guard.lock:
        # Flower restores the default handler once it started exiting: leave it be then.
        if _guard.reason is not None or not callable(signal.getsignal(signal.SIGTERM)):
            return
        _guard.reason = reason
    # stderr, not logging: Flower configures its own handlers; SiteNode reads this line.
    print(f"{GUARD_PREFIX} {reason}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def install_thread_guard() -> None:
    """Stop this SuperNode (SIGTERM to itself) when one of its threads dies of an exception.

    Flower's SIGTERM handler then exits gracefully (the node deactivates itself, so the
    restarted SuperNode may join at once) and :func:`main` exits with
    :data:`EXIT_STOPPED_WORKING`. Does nothing once the process is already stopping.
    """
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        previous(args)
        if not issubclass(args.exc_type, SystemExit):
            name = args.thread.name if args.thread is not None else "?"
            first = str(args.exc_value).strip().splitlines()[:1]  # one line for SiteNode
            _stop(f"thread {name} died: {args.exc_type.__name__}: {''.join(first)}")

    threading.excepthook = hook


def main(argv: Sequence[str] | None = None) -> None:
    """``--heartbeat-interval S <fastpoll flags> -- <flower-supernode flags>``: run it.

    Exits with :data:`EXIT_STOPPED_WORKING` when Flower's pull loop ended or one of its threads
    died; Flower's own exit codes otherwise.
    """
    parser = argparse.ArgumentParser(prog="python -m fedmed.flower.liveness")
    parser.add_argument("--heartbeat-interval", type=float, required=True)
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        set_heartbeat_interval(args.heartbeat_interval)
    except ValueError as err:
        parser.error(str(err))
    install_thread_guard()
    from fedmed.flower import fastpoll

    try:
        fastpoll.main(rest)
        # Flower's pull loop only returns after an error it logged (the node deactivated
        # itself); its Runtime API thread would keep this process alive, doing nothing.
        _stop("Flower's pull loop ended (see the error above)")
        time.sleep(_EXIT_GRACE_S)  # Flower's SIGTERM handler raises SystemExit meanwhile
    except SystemExit:
        if _guard.reason is None:
            raise
        raise SystemExit(EXIT_STOPPED_WORKING) from None
    logging.shutdown()
    os._exit(EXIT_STOPPED_WORKING)


if __name__ == "__main__":
    main()
