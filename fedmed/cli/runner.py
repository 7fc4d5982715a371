"""Run a CLI function: expected errors become one line and an exit code, bugs keep tracebacks."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from fedmed.errors import FedmedError

__all__ = ["add_version", "configure_logging", "run_command"]


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version`` for every fedmed command: fedmed's version and the Flower it runs on.

    Example:
        >>> add_version(argparse.ArgumentParser(prog="fedmed-sim"))
    """
    from fedmed import __version__

    try:
        flower = version("flwr")
    except PackageNotFoundError:  # pragma: no cover - flwr is a dependency
        flower = "not installed"
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s (fedmed {__version__}, flwr {flower})"
    )


def configure_logging(verbose: bool = False) -> None:
    """Log to stderr in one readable format; ``verbose`` lowers the level to DEBUG."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_command(func: Callable[[], int | None], *, prog: str) -> int:
    """Call ``func`` and turn its outcome into a process exit code.

    A :class:`FedmedError` prints ``prog: error: <message>`` on one line (no traceback) and
    returns the error's exit code; Ctrl-C returns 130; any other exception propagates.
    """
    try:
        code = func()
    except FedmedError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)
