"""What ``fedmed-sim`` prints: one line per round while a run goes on, and a logging set-up in
which those lines are the progress report (the apps' own logs only with ``--verbose``).

Example:
    >>> configure_sim_logging(False)
    >>> format_record("fedavg", {"round": 0, "status": "initial", "holdout": {"dice": 0.1}})
    '[fedavg] round 0 (initial model): held-out Dice 0.100'
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmed.cli.runner import configure_logging
from fedmed.task import ensure_app_logging

__all__ = ["RoundPrinter", "configure_sim_logging", "format_record"]


class RoundPrinter:
    """Prints each new record of a ``metrics.jsonl`` while a run writes it (a polling thread).

    Example:
        >>> with RoundPrinter("fedavg", Path("OUT/runs/fedavg")) as printer:
        ...     run_federation(...)          # one line per round as the records arrive
    """

    def __init__(self, label: str, out_dir: Path) -> None:
        from fedmed.server.report import MetricsLog

        self.label, self.log = label, MetricsLog(out_dir)
        self.seen = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RoundPrinter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.flush()

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            self.flush()

    def flush(self) -> None:
        records = self.log.read()
        for record in records[self.seen :]:
            print(format_record(self.label, record), flush=True)
        self.seen = len(records)


def format_record(label: str, record: Mapping[str, Any]) -> str:
    """One console line per round: held-out Dice, each site's validation Dice (and, at a demo
    site with noisy labels, its Dice against the clean labels), seconds."""
    holdout = (record.get("holdout") or {}).get("dice")
    dice = "-" if holdout is None else f"{holdout:.3f}"
    if record.get("status") == "initial":
        return f"[{label}] round 0 (initial model): held-out Dice {dice}"
    if record.get("status") == "stopped":
        return f"[{label}] stopped before round {record['round']}: {record.get('reason', '')}"
    sites = ", ".join(
        f"{s} {m['val-dice']:.3f}"
        + (f" (clean labels {m['val-dice-clean']:.3f})" if "val-dice-clean" in m else "")
        for s, m in sorted((record.get("sites") or {}).items())
        if m.get("val-dice") is not None
    )
    status = "" if record.get("status") == "ok" else f" [{record.get('status')}]"
    seconds = record.get("duration-s")
    took = f", {seconds:.1f} s" if seconds is not None else ""
    return (
        f"[{label}] round {record['round']}{status}: held-out Dice {dice}"
        f" | site val Dice: {sites or '-'}{took}"
    )


def configure_sim_logging(verbose: bool) -> None:
    """One handler on ``fedmed`` (so the apps add none); INFO with --verbose, else warnings
    only: the round lines printed by this command are the progress report."""
    configure_logging(verbose)
    if not verbose:  # other libraries' INFO lines (alembic, ...) are not progress either
        logging.getLogger().setLevel(logging.WARNING)
    ensure_app_logging()  # the apps' handler, so they add none
    root = logging.getLogger("fedmed")
    root.propagate = False
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        # simulated sites never check signatures, so the unsigned-model warning says nothing
        logging.getLogger("fedmed.security.guard").setLevel(logging.ERROR)
