"""The fedmed ServerApp: reads the run config once, then runs :class:`Federation`.

Flower loads it as ``fedmed.server.app:app`` (the FAB's ``serverapp`` component imports it).

Example:
    >>> from flwr.simulation import run_simulation
    >>> run_simulation(server_app=make_server_app(RunSettings(num_rounds=2)),
    ...                client_app=client_app, num_supernodes=2)
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmed.flower.version import check_flower_version
from fedmed.runsettings import RunSettings
from fedmed.task import ensure_app_logging

from .federation import Federation

__all__ = ["app", "make_server_app"]

logger = logging.getLogger(__name__)


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp; with ``settings`` it ignores ``run_config`` (simulation, tests)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        check_flower_version()
        ensure_app_logging()
        run_settings = settings or RunSettings.from_run_config(dict(context.run_config))
        result = Federation(grid, run_settings).run()
        logger.info(
            "run finished: %d rounds, %d failed attempts%s, output in %s",
            result.rounds_completed,
            result.failed_attempts,
            f" (stopped early: {result.stopped})" if result.stopped else "",
            run_settings.out_dir,
        )

    return server_app


app = make_server_app()
