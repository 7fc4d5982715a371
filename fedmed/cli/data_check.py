"""``fedmed data``: placeholder until the data pipeline lands."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``data`` subcommand."""
    parser = subparsers.add_parser("data", help="not available yet")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    print("not available yet")
    return 2
