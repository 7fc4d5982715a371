"""Run the fedmed server and client apps on Flower's simulation engine (Ray), in this process.

Entry point: Flower 1.41's Python simulation runtime (``flwr.simulation.run_simulation``) with
``make_server_app(settings)`` and ``make_client_app(resolve_site=PartitionSites(folders))`` -
the same apps a deployment runs. Why not ``flwr run APP local --federation-config ...`` (the
simulation SuperLink)? It ships the app as a FAB whose settings travel as ``run_config``, but
simulated nodes only know their ``partition-id``: the client app would need the site folders
in ``run_config``, which ``RunSettings`` rightly refuses as unknown keys, so it would mean a
forked app; it also leaves a detached SuperLink process running and adds 5-6 s of polling per
message. ``run_simulation`` passes the typed :class:`RunSettings` straight to the server app
(``run_config`` stays empty and unused), keeps every process a child of this one, and shuts Ray
down when it returns. Flower marks it deprecated (a log line, suppressed here); the e2e tests
pin the behaviour against the installed flwr.

Process hygiene: telemetry and update checks off, runtime dependency installation off, Ray's
temporary folder inside the output folder (or a short private one when that path is too long
for Ray's Unix sockets, removed afterwards), and Ray shut down on return, error or Ctrl-C
(which exits the process: see ``_exit_on_interrupt``).

Example:
    >>> run_federation(RunSettings(num_rounds=2, out_dir="out/fedavg"),
    ...                ("data/site-A", "data/site-B"), SiteResources(), workdir="out")
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from fedmed.errors import ConfigError, FederationError

if TYPE_CHECKING:
    from fedmed.server.settings import RunSettings

__all__ = ["SiteResources", "run_federation", "simulation_env", "torch_threads"]

logger = logging.getLogger(__name__)

# Ray puts Unix sockets at RAY_TMPDIR/ray/session_<date>_<time>_<us>_<pid>/sockets/plasma_store
# (about 64 bytes after RAY_TMPDIR) and the OS limit for such a path is 107 bytes.
_MAX_RAY_TMPDIR = 40
_CACHE_MODES = ("auto", "memory", "none")


@dataclass(frozen=True)
class SiteResources:
    """What each simulated site may use and how many train at once.

    ``num_cpus`` / ``num_gpus`` are a site's Ray resources (``num_gpus`` may be a fraction of a
    GPU); ``max_parallel`` sites train at once (Ray gets ``max_parallel * num_cpus`` CPUs), so
    memory grows with ``max_parallel``, not with the number of sites. ``cache_mode`` is the
    sites' volume cache: ``memory`` keeps every site's volumes in its actor (fast for a few
    sites), ``none`` reads them each round (flat memory for many), ``auto`` picks ``memory`` up
    to ``max_parallel * 4`` sites.

    Example:
        >>> SiteResources(num_cpus=1, num_gpus=0.25, max_parallel=4).ray_cpus
        4
    """

    num_cpus: int = 1
    num_gpus: float = 0.0
    max_parallel: int = 2
    cache_mode: str = "auto"

    def __post_init__(self) -> None:
        if self.num_cpus < 1:
            raise ConfigError(f"resources num-cpus is {self.num_cpus}: it must be >= 1")
        if not 0.0 <= self.num_gpus <= 1.0:
            raise ConfigError(f"resources num-gpus is {self.num_gpus}: use 0 .. 1 (a fraction)")
        if self.max_parallel < 1:
            raise ConfigError(f"resources max-parallel is {self.max_parallel}: it must be >= 1")
        if self.cache_mode not in _CACHE_MODES:
            raise ConfigError(
                f"resources cache-mode is {self.cache_mode!r}: use one of {', '.join(_CACHE_MODES)}"
            )

    @property
    def ray_cpus(self) -> int:
        """CPUs Ray is started with."""
        return self.num_cpus * self.max_parallel

    def site_cache_mode(self, sites: int) -> str:
        """The cache mode the sites use for a federation of ``sites``."""
        if self.cache_mode != "auto":
            return self.cache_mode
        return "memory" if sites <= 4 * self.max_parallel else "none"


@contextlib.contextmanager
def simulation_env(workdir: str | Path) -> Iterator[Path]:
    """Environment for one simulation: Flower home, Ray temp folder, no telemetry or installs.

    Restores the previous environment on exit and removes a private Ray folder it made.
    """
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    ray_dir = workdir / "ray"
    private = None
    if len(str(ray_dir)) > _MAX_RAY_TMPDIR:
        private = Path(tempfile.mkdtemp(prefix="fedmed-ray-"))
        logger.info("output path too long for Ray's sockets; Ray temp files in %s", private)
        ray_dir = private
    ray_dir.mkdir(parents=True, exist_ok=True)
    values = {
        "RAY_TMPDIR": str(ray_dir),
        "FLWR_HOME": str(workdir / "flwr"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # else Ray warns about GPU env vars
        "RAY_DEDUP_LOGS": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield ray_dir
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Limit torch's intra-op threads in this process for a block, then restore them.

    The server's held-out evaluation and the centralized baseline run in this process next to
    the Ray actors (one thread each); torch's default of one thread per core, competing with
    them, made convolutions tens of times slower on a busy 2-core machine.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _DropDeprecation(logging.Filter):
    """Hide Flower's deprecation notice for ``run_simulation``: the choice is deliberate and
    documented in this module; every other Flower warning still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


@contextlib.contextmanager
def _exit_on_interrupt() -> Iterator[None]:
    """Ctrl-C during a simulation: shut Ray down and exit the process with status 130.

    Flower 1.41's simulation runtime cannot be interrupted: a KeyboardInterrupt in the main
    thread lands in a ThreadPoolExecutor's exit, which joins workers that only stop on an
    event set after that join (seen: still running 60 s after SIGINT). So the handler stops
    Ray (every actor, raylet and GCS process) itself and leaves with ``os._exit``.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        print("fedmed-sim: interrupted; stopping Ray", file=sys.stderr, flush=True)
        logging.getLogger("flwr").setLevel(logging.CRITICAL)  # its workers' dying-actor errors
        _shutdown_ray()
        sys.stdout.flush()
        os._exit(130)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run_federation(
    settings: RunSettings,
    folders: Sequence[str | Path],
    resources: SiteResources,
    *,
    workdir: str | Path,
    verbose: bool = False,
) -> None:
    """Simulate ``len(folders)`` sites (site i trains on ``folders[i]``) with ``settings``.

    Raises FederationError when the run fails (the cause is chained); Ray is always shut down.
    """
    if settings.min_sites > len(folders):
        raise ConfigError(
            f"min-sites {settings.min_sites} exceeds the {len(folders)} simulated sites: lower "
            "min-sites or add sites"
        )
    with warnings.catch_warnings():
        # flwr imports typer, which uses an API click 8.3 deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        from flwr.simulation import run_simulation

        from fedmed.client.app import PartitionSites, make_client_app
        from fedmed.server.app import make_server_app

    resolve = PartitionSites(
        tuple(str(Path(f).absolute()) for f in folders),
        cache_mode=resources.site_cache_mode(len(folders)),
        device="cuda" if resources.num_gpus > 0 else "cpu",
    )
    backend = {
        "client_resources": {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus},
        "init_args": {
            "num_cpus": resources.ray_cpus,
            "include_dashboard": False,
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.WARNING,
        },
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    quiet = _DropDeprecation()
    flwr_logger.addFilter(quiet)
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    try:
        with (
            simulation_env(workdir),
            torch_threads(resources.num_cpus),
            _exit_on_interrupt(),
        ):
            run_simulation(
                server_app=make_server_app(settings),
                client_app=make_client_app(resolve_site=resolve),
                num_supernodes=len(folders),
                backend_config=backend,
            )
    except (KeyboardInterrupt, FederationError, ConfigError):
        raise
    except Exception as err:
        raise FederationError(
            f"simulation in {settings.out_dir} failed ({type(err).__name__}: {err}); rerun "
            "with --verbose for Flower's and the sites' logs"
        ) from err
    finally:
        _shutdown_ray()
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(quiet)
