"""Argument parsing and dispatch for the four console scripts."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fedmed.cli.runner import add_version, configure_logging, run_command

__all__ = ["build_parser", "client_main", "main", "server_main", "sim_main"]

# (module, ...) in the order `fedmed --help` lists them; each module has register(subparsers).
_COMMAND_MODULES = (
    "fedmed.cli.demo_data",
    "fedmed.cli.data_check",
    "fedmed.cli.certs",
    "fedmed.cli.site_key",
    "fedmed.cli.train",
    "fedmed.cli.infer",
    "fedmed.cli.evaluate",
    "fedmed.cli.verify",
)


def build_parser() -> argparse.ArgumentParser:
    """The ``fedmed`` utility parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedmed", description="fedmed utilities: demo data, data checks, certificates, ..."
    )
    add_version(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedmed``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    return run_command(lambda: args.func(args), prog="fedmed")


def _delegate(module_name: str, argv: Sequence[str] | None, *, entry: str = "main") -> int:
    function = getattr(importlib.import_module(module_name), entry)
    return int(function(list(sys.argv[1:] if argv is None else argv)) or 0)


def server_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedmed-server`` (the central side)."""
    return _delegate("fedmed.server.cli", argv)


def client_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedmed-client`` (a hospital site)."""
    return _delegate("fedmed.client.cli", argv)


def sim_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedmed-sim`` (a local simulated federation)."""
    return _delegate("fedmed.simulation.cli", argv, entry="console_main")


if __name__ == "__main__":
    sys.exit(main())
