"""Run the fedmed server and client apps on a Flower SuperLink in simulation mode (Ray).

Entry point: Flower 1.41's supported simulation runtime, the one ``flwr run APP local`` uses.
This module starts ``flower-superlink --simulation --insecure --isolation subprocess`` on a
free 127.0.0.1 port (in-memory state, runtime dependency installation disabled), submits the
fedmed app as a FAB through the Control API (``StartRun`` with the run's settings as
``override_config`` and the simulation's size and resources as ``override_federation_config``,
like ``flwr run --run-config ... --federation-config "num-supernodes=N ..."``), follows the run
to its end and stops the SuperLink. The SuperLink's executor starts ``flwr-simulation``, which
installs the FAB, fuses ``run_config`` (``flwr/simulation/app.py``: ``context.run_config =
get_fused_config_from_dir(app_path, run.override_config)``; the simulated nodes get the same
via ``DeprecatedRunInfoStore.register_context``) and runs Ray with the SuperLink's apps.

The FAB is :mod:`fedmed.server.submit`'s shim pointed at :mod:`fedmed.simulation.apps`: the
deployment's server app (``make_server_app(settings)``) and client app (``make_client_app``)
with a resolver that finds site i's folder in the ``sim-sites`` run-config key (simulated
nodes only know their ``partition-id``). ``RunSettings`` still refuses unknown keys: the
``sim-`` keys are split off before it sees the rest. Why not ``flwr run`` itself: its local
SuperLink listens on the fixed port 39091 with state in ``$FLWR_HOME/local-superlink`` and is
left running detached, while this one is a child of this process on its own port.

Process hygiene: telemetry and update checks off, runtime dependency installation off, Ray's
temporary folder inside the output folder (or a short private one when that path is too long
for Ray's Unix sockets, removed afterwards), Flower's home in the output folder, and the
SuperLink's whole process tree (executor, ``flwr-simulation``, Ray's GCS, raylet and actors)
stopped on return, error or Ctrl-C (:func:`fedmed.flower.process.stop_process`). The run's
log (Flower's, the server app's and, with ``verbose``, the sites') is kept in
``<out-dir>/simulation.log``, the SuperLink's in ``<out-dir>/superlink.log``. Ray gives its
raylet a fixed 30 s to start (``ray/_private/node.py``); when an overloaded machine misses
that, the simulation is started once more and resumes after round 0.

Example:
    >>> run_federation(RunSettings(num_rounds=2, out_dir="out/fedavg"),
    ...                ("data/site-A", "data/site-B"), SiteResources(), workdir="out")
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from fedmed.errors import ConfigError, FederationError

if TYPE_CHECKING:
    from fedmed.runsettings.settings import RunSettings

    from .apps import SitePolicy

__all__ = [
    "SiteResources",
    "run_federation",
    "sigterm_as_interrupt",
    "simulation_env",
    "torch_threads",
]

logger = logging.getLogger(__name__)

# Ray puts Unix sockets at RAY_TMPDIR/ray/session_<date>_<time>_<us>_<pid>/sockets/plasma_store
# (about 64 bytes after RAY_TMPDIR) and the OS limit for such a path is 107 bytes.
_MAX_RAY_TMPDIR = 40
_CACHE_MODES = ("auto", "memory", "none")
_APPS = "fedmed.simulation.apps"
_START_TIMEOUT = 120.0  # seconds for the SuperLink to answer /health on a loaded machine
_RAY_START_FAILURE = "The current node timed out during startup"
_RAY_START_ATTEMPTS = 2


@dataclass(frozen=True)
class SiteResources:
    """What each simulated site may use and how many train at once.

    ``num_cpus`` / ``num_gpus`` are a site's Ray resources (``num_gpus`` may be a fraction of a
    GPU); ``max_parallel`` sites train at once (Ray gets ``max_parallel * num_cpus`` CPUs), so
    memory grows with ``max_parallel``, not with the number of sites. ``cache_mode`` is the
    sites' volume cache: ``memory`` keeps every site's volumes in its actor (fast for a few
    sites), ``none`` reads them each round (flat memory for many), ``auto`` picks ``memory`` up
    to ``max_parallel * 4`` sites. ``ray_address`` runs the sites on an existing Ray cluster
    (``ray start --head``; its CPUs and GPUs then bound how many sites train at once, and
    ``max_parallel`` does not apply); "" starts a private local Ray.

    Example:
        >>> SiteResources(num_cpus=1, num_gpus=0.25, max_parallel=4).ray_cpus
        4
    """

    num_cpus: int = 1
    num_gpus: float = 0.0
    max_parallel: int = 2
    cache_mode: str = "auto"
    ray_address: str = ""  # an existing Ray cluster ("HOST:PORT"); "" starts a local one

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
def simulation_env(workdir: str | Path, *, ray_address: str = "") -> Iterator[dict[str, str]]:
    """Environment variables for one simulation's Flower processes (this process's own
    environment is left alone): Flower home and Ray temp folder under ``workdir``, no
    telemetry, update check or runtime installs; ``RAY_ADDRESS`` to join an existing cluster
    (otherwise an inherited one is cleared: the simulation starts its own). Removes a private
    Ray folder it made.
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
    try:
        yield {
            "RAY_TMPDIR": str(ray_dir),
            "FLWR_HOME": str(workdir / "flwr"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # else Ray warns about GPU env vars
            "RAY_DEDUP_LOGS": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "RAY_ADDRESS": ray_address,
        }
    finally:
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


def simulation_fab() -> Any:
    """The FAB a simulation runs: fedmed's shim app pointed at :mod:`.apps`, declaring every
    run-settings key and the ``sim-`` keys (Flower refuses overrides the FAB does not declare).
    """
    import json

    from fedmed.server.submit import fab_files

    from fedmed.flower.fab import fab_from_files

    from .apps import SIM_KEYS

    files = fab_files(server_module=f"{_APPS}:server_app", client_module=f"{_APPS}:client_app")
    pyproject = files["pyproject.toml"].decode()
    # fab_files writes [tool.flwr.app.config] last: the simulation keys join that table
    pyproject += "".join(f'"{key}" = {json.dumps(value)}\n' for key, value in SIM_KEYS.items())
    config = tomllib.loads(pyproject)["tool"]["flwr"]["app"]["config"]
    if not set(SIM_KEYS) <= set(config):
        raise RuntimeError("fedmed.server.submit.fab_files no longer ends with the config table")
    files["pyproject.toml"] = pyproject.encode()
    return fab_from_files(files)


def _federation_config(resources: SiteResources, sites: int, *, verbose: bool) -> Any:
    from fedmed.flower.control import simulation_config

    return simulation_config(
        num_supernodes=sites,
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
        ray_cpus=None if resources.ray_address else resources.ray_cpus,
        verbose=verbose,
    )


def _submit(client: Any, settings: RunSettings, run_config: dict[str, Any], federation: Any) -> int:
    import httpx

    from fedmed.flower.control import start_run

    try:
        run_id, note = start_run(client, simulation_fab(), run_config, federation_config=federation)
    except httpx.HTTPError as err:
        raise FederationError(
            f"the simulation SuperLink refused the run of {settings.out_dir}: {err}"
        ) from err
    if run_id is None:
        raise FederationError(f"the simulation SuperLink did not start the run: {note}")
    return run_id


class _LogSink:
    """Writes the run's streamed log to a file and, with ``echo``, to stderr."""

    def __init__(self, path: Path, *, echo: bool) -> None:
        self.path, self.echo = path, echo
        self.lock = threading.Lock()
        path.write_text("")

    def __call__(self, text: str) -> None:
        with self.lock, self.path.open("a", encoding="utf-8") as out:
            out.write(text)
        if self.echo:
            sys.stderr.write(text)
            sys.stderr.flush()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a simulation runs, SIGTERM (e.g. ``timeout``) raises KeyboardInterrupt like Ctrl-C,
    so the clean-up that stops the SuperLink, ``flwr-simulation`` and Ray runs instead of the
    process dying with its children orphaned. Only where SIGTERM has its default action, in
    the main thread (a handler set by the caller is left alone)."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_federation(
    settings: RunSettings,
    folders: Sequence[str | Path],
    resources: SiteResources,
    *,
    workdir: str | Path,
    verbose: bool = False,
    policy: SitePolicy | None = None,
) -> None:
    """Simulate ``len(folders)`` sites (site i trains on ``folders[i]``) with ``settings``;
    ``policy`` is what the simulated sites allow (disclosure floor, models travelling).

    Raises FederationError when the run fails (Flower's reason and the log's tail in the
    message); the SuperLink and everything it started are always stopped.
    """
    if settings.min_sites > len(folders):
        raise ConfigError(
            f"min-sites {settings.min_sites} exceeds the {len(folders)} simulated sites: lower "
            "min-sites or add sites"
        )
    from .apps import sim_run_config

    out_dir = settings.out_path.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    run_config: dict[str, Any] = dict(settings.to_run_config())
    run_config.update(
        sim_run_config(
            [str(Path(f).absolute()) for f in folders],
            cache_mode=resources.site_cache_mode(len(folders)),
            device="cuda" if resources.num_gpus > 0 else "cpu",
            threads=resources.num_cpus,
            policy=policy,
        )
    )
    federation = _federation_config(resources, len(folders), verbose=verbose)
    run_log = out_dir / "simulation.log"
    sink = _LogSink(run_log, echo=verbose)
    for attempt in range(1, _RAY_START_ATTEMPTS + 1):
        with sigterm_as_interrupt():  # a SIGTERM still stops the SuperLink, Ray and all
            outcome = _run_once(
                settings,
                run_config,
                federation,
                workdir=workdir,
                sink=sink,
                ray_address=resources.ray_address,
            )
        if outcome.ok:
            return
        text = run_log.read_text(encoding="utf-8", errors="replace")
        if _RAY_START_FAILURE not in text or attempt == _RAY_START_ATTEMPTS:
            break
        # Ray gives its raylet a fixed 30 s to register (ray/_private/node.py): on an
        # overloaded machine that start fails before any round; the run resumes after round 0
        logger.warning("Ray did not start in time (machine overloaded?); starting again")
        sink("\n--- fedmed-sim: Ray did not start in time; starting the simulation again ---\n")
    from fedmed.flower.process import tail

    raise FederationError(
        f"simulation in {settings.out_dir} ended {outcome.status}: "
        f"{outcome.details or 'no reason given'}; log {run_log}:\n{tail(run_log, 15)}"
    )


def _run_once(
    settings: RunSettings,
    run_config: dict[str, Any],
    federation: Any,
    *,
    workdir: str | Path,
    sink: _LogSink,
    ray_address: str = "",
) -> Any:
    """Start a simulation SuperLink, submit the run, follow it to its end, stop everything."""
    with warnings.catch_warnings():
        # flwr.cli imports typer, which uses an API click 8.3 deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        from fedmed.server.submit import wait_for_run

        from fedmed.flower.control import control_client
        from fedmed.flower.process import (
            flower_env,
            free_loopback_port,
            start_process,
            stop_process,
            wait_for_health,
        )

    out_dir = settings.out_path.absolute()
    link_log = out_dir / "superlink.log"
    link_log.unlink(missing_ok=True)
    with simulation_env(workdir, ray_address=ray_address) as extra:
        env = flower_env(Path(extra["FLWR_HOME"]), extra)
        port = free_loopback_port()
        command = [
            str(Path(sys.executable).parent / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ]
        address = f"127.0.0.1:{port}"
        proc = start_process(command, env=env, log_file=link_log, cwd=out_dir)
        try:
            wait_for_health(
                address, ca_cert=None, timeout=_START_TIMEOUT, proc=proc, log_file=link_log
            )
            with contextlib.ExitStack() as stack:
                # Flower's client factory prints "Using SuperLink: ..." to stdout (only it:
                # fedmed-sim's round lines print while the run goes on)
                with contextlib.redirect_stdout(io.StringIO()):
                    client = stack.enter_context(control_client(address, ca_cert=None))
                run_id = _submit(client, settings, run_config, federation)
                logger.info("simulation run %d submitted to %s", run_id, address)
                return wait_for_run(
                    client,
                    run_id,
                    timeout=settings.run_deadline,
                    log_sink=sink,
                    alive=lambda: proc.poll() is None,
                )
        finally:
            stop_process(proc, timeout=10.0)
