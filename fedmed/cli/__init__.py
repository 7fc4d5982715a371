"""Entry points: ``fedmed`` (utilities), ``fedmed-server``, ``fedmed-client``, ``fedmed-sim``.

Each ``fedmed`` subcommand lives in its own module exposing ``register(subparsers)``; the
module imports heavy dependencies (torch, flwr) inside its run function so ``--help`` is fast.
"""

from fedmed.cli.main import client_main, main, server_main, sim_main

__all__ = ["client_main", "main", "server_main", "sim_main"]
