"""Register site keys, build the app, submit and follow a run on a SuperLink.

The Control API calls (the ones ``flwr run`` and ``flwr supernode register`` make) are in
:mod:`fedmed.flower.control`; this module decides what their answers mean (an already
registered key is fine, a refused run is a :class:`FederationError`, a busy SuperLink's 500 on
a status poll is retried) and waits with bounds.

The app shipped to the sites (the FAB) is :mod:`fedmed.flower.fab`'s thin shim declaring every
run-config key with fedmed's defaults (:class:`RunSettings`) and importing the installed
fedmed's apps, so every site runs the fedmed it installed. Its bytes (and sha256, which sites
pin, see :mod:`fedmed.flower.pinning`) depend only on the fedmed version and the two module
names.

Example:
    >>> with control_client(link.address, ca_cert=ca) as client:
    ...     register_sites(client, {"A": Path("certs/siteA.pub")})
    ...     run_id = submit_run(client, build_fab(), run_config={"num-rounds": 2})
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from fedmed.errors import ConfigError, FederationError, SecurityError
from fedmed.flower import control
from fedmed.flower.control import COMPLETED, FINISHED, ControlHttpClient, control_client
from fedmed.flower.fab import (
    APP_NAME,
    CLIENT_MODULE,
    SERVER_MODULE,
    Fab,
    fab_from_files,
    shim_files,
)
from fedmed.runsettings import RunSettings
from fedmed.security.pki import load_site_public_key_pem

__all__ = [
    "RunOutcome",
    "build_fab",
    "control_client",
    "default_run_config",
    "fab_files",
    "online_sites",
    "register_sites",
    "run_status",
    "stop_run",
    "stop_unfinished_runs",
    "submit_run",
    "wait_for_run",
    "wait_for_sites",
]

log = logging.getLogger(__name__)

_MAX_POLL_ERRORS = 30  # consecutive failed status polls before giving up on a run


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: ``status`` is Flower's ``finished:completed|failed|stopped``."""

    run_id: int
    status: str
    details: str
    seconds: float

    @property
    def ok(self) -> bool:
        """Whether the run finished as completed."""
        return self.status == f"{FINISHED}:{COMPLETED}"


def default_run_config() -> dict[str, str | int | float | bool]:
    """Every run-config key with fedmed's default (the FAB's ``[tool.flwr.app.config]``).

    Flower refuses override keys the FAB does not declare, so the FAB declares them all.
    """
    return RunSettings().to_run_config()


def fab_files(
    *,
    server_module: str = SERVER_MODULE,
    client_module: str = CLIENT_MODULE,
) -> dict[str, bytes]:
    """The shim app's files (relative path -> bytes): no per-run content.

    ``server_module``/``client_module`` name installed modules exposing ``app``; tests point
    them at a minimal app.
    """
    return shim_files(
        default_run_config(), server_module=server_module, client_module=client_module
    )


def build_fab(
    *,
    server_module: str = SERVER_MODULE,
    client_module: str = CLIENT_MODULE,
) -> Fab:
    """Build the shim app as a Flower FAB (same fedmed version and modules -> same bytes).

    Example:
        >>> build_fab().hash_str == build_fab().hash_str
        True
    """
    return fab_from_files(fab_files(server_module=server_module, client_module=client_module))


def _error_text(err: httpx.HTTPError) -> str:
    if isinstance(err, httpx.HTTPStatusError):
        return f"HTTP {err.response.status_code}: {err.response.text[:300]}"
    return str(err) or type(err).__name__


def register_sites(client: ControlHttpClient, sites: Mapping[str, Path]) -> dict[str, int | None]:
    """Register each site's public key under its name; already registered keys are fine.

    Returns site -> node id (None when the key was registered before).

    Raises:
        SecurityError: a key file is invalid or the SuperLink refused it for another reason.
    """
    result: dict[str, int | None] = {}
    for site, key_path in sites.items():
        public_key = load_site_public_key_pem(key_path)
        try:
            node_id = control.register_node(client, public_key, f"site-{site}")
        except httpx.HTTPStatusError as err:
            # 412 = this key is registered already (registrations persist in the database).
            if err.response.status_code == 412 and "already" in err.response.text.lower():
                log.info("site %s: key already registered", site)
                result[site] = None
                continue
            raise SecurityError(
                f"the SuperLink refused site {site}'s key {key_path}: {_error_text(err)}"
            ) from err
        log.info("site %s registered as node %d", site, node_id)
        result[site] = node_id
    return result


def online_sites(client: ControlHttpClient) -> dict[str, int]:
    """Registered names -> node id of the sites online now."""
    return control.online_nodes(client)


def wait_for_sites(
    client: ControlHttpClient,
    *,
    min_sites: int,
    timeout: float,
    poll: float = 1.0,
    alive: Callable[[], bool] | None = None,
) -> dict[str, int]:
    """Wait until at least ``min_sites`` sites are online; bounded by ``timeout`` seconds.

    Raises:
        FederationError: too few sites joined in time, or ``alive()`` turned False.
    """
    deadline = time.monotonic() + timeout
    seen: dict[str, int] = {}
    last_logged = -1
    while True:
        if alive is not None and not alive():
            raise FederationError("the SuperLink stopped while waiting for sites")
        seen = online_sites(client)
        if len(seen) != last_logged:
            log.info("%d/%d site(s) online: %s", len(seen), min_sites, ", ".join(sorted(seen)))
            last_logged = len(seen)
        if len(seen) >= min_sites:
            return seen
        if time.monotonic() >= deadline:
            raise FederationError(
                f"only {len(seen)} of min-sites = {min_sites} site(s) joined within "
                f"{timeout:.0f} s (online: {', '.join(sorted(seen)) or 'none'}): start "
                "`fedmed-client --site X` at the sites, check they reach the server address "
                "and hold registered keys, or raise [server] wait-for-sites"
            )
        time.sleep(poll)


def submit_run(
    client: ControlHttpClient,
    fab: Fab,
    *,
    run_config: Mapping[str, str | int | float | bool] | None = None,
) -> int:
    """Submit ``fab`` as a new run (``run_config`` overrides its defaults); return the run id.

    Raises:
        ConfigError: a ``run_config`` key is not a fedmed setting.
        FederationError: the SuperLink refused the run.
    """
    known = default_run_config()
    unknown = sorted(set(run_config or {}) - set(known))
    if unknown:
        raise ConfigError(
            f"[app] key(s) {', '.join(unknown)} are not fedmed run settings: use "
            f"{', '.join(sorted(known))}"
        )
    try:
        run_id, note = control.start_run(client, fab, dict(run_config or {}))
    except httpx.HTTPError as err:
        raise FederationError(f"the SuperLink refused the run: {_error_text(err)}") from err
    if run_id is None:
        raise FederationError(f"the SuperLink did not start the run: {note}")
    log.info("submitted run %d (app %s, FAB sha256 %s)", run_id, APP_NAME, fab.hash_str[:12])
    return run_id


def _stream_logs(client: ControlHttpClient, run_id: int, sink: Callable[[str], None]) -> None:
    try:
        for text in control.stream_logs(client, run_id):
            sink(text)
    except (httpx.HTTPError, ValueError) as err:
        log.debug("log stream of run %d ended: %s", run_id, err)


def run_status(client: ControlHttpClient, run_id: int) -> tuple[str, str]:
    """(``status:sub-status`` or ``status``, details) of a run."""
    statuses = control.run_statuses(client, run_id)
    if run_id not in statuses:
        raise FederationError(f"run {run_id} is unknown to the SuperLink")
    return statuses[run_id]


def wait_for_run(
    client: ControlHttpClient,
    run_id: int,
    *,
    timeout: float,
    poll: float = 1.0,
    log_sink: Callable[[str], None] | None = None,
    alive: Callable[[], bool] | None = None,
) -> RunOutcome:
    """Follow a run until it finishes, streaming its logs to ``log_sink``; bounded by ``timeout``.

    On timeout the run is stopped and :class:`FederationError` raised.
    """
    start = time.monotonic()
    if log_sink is not None:
        # The stream ends when the run finishes; the thread is a daemon so a hung stream never
        # blocks exit.
        threading.Thread(
            target=_stream_logs, args=(client, run_id, log_sink), daemon=True, name="run-logs"
        ).start()
    errors = 0
    while True:
        if alive is not None and not alive():
            raise FederationError(f"the SuperLink stopped while run {run_id} was going on")
        try:
            status, details = run_status(client, run_id)
            errors = 0
        except (httpx.TransportError, httpx.HTTPStatusError) as err:
            # A busy SuperLink answers 500 "database is locked" now and then (its SQLite
            # state under load): a transient failure of a status poll is not the run's end.
            transient = not isinstance(err, httpx.HTTPStatusError) or (
                err.response.status_code >= 500
            )
            errors += 1
            if not transient or errors > _MAX_POLL_ERRORS:
                raise FederationError(
                    f"cannot read the status of run {run_id}: {_error_text(err)}"
                ) from err
            log.warning("run %d: status poll failed (%s); retrying", run_id, _error_text(err))
            time.sleep(poll)
            continue
        if status.startswith(FINISHED):
            time.sleep(min(2.0, poll * 2))  # let the log stream deliver its tail
            return RunOutcome(run_id, status, details, time.monotonic() - start)
        if time.monotonic() - start > timeout:
            stop_run(client, run_id)
            raise FederationError(
                f"run {run_id} did not finish within [server] run-timeout = {timeout:.0f} s "
                f"(status {status}); it was stopped"
            )
        time.sleep(poll)


def stop_run(client: ControlHttpClient, run_id: int) -> None:
    """Ask the SuperLink to stop a run (errors are logged, not raised)."""
    try:
        control.stop_run(client, run_id)
        log.info("run %d stopped", run_id)
    except httpx.HTTPError as err:
        log.warning("could not stop run %d: %s", run_id, _error_text(err))


def stop_unfinished_runs(client: ControlHttpClient) -> list[int]:
    """Stop runs left unfinished by an earlier server session (same database); return their ids.

    A restarted ``fedmed-server`` submits a fresh run that resumes from the checkpoints, so a
    run the crashed session left behind must not compete with it for the sites.
    """
    stale = [
        run_id
        for run_id, (status, _) in control.run_statuses(client).items()
        if status.partition(":")[0] != FINISHED
    ]
    for run_id in stale:
        log.warning("run %d from an earlier session is unfinished: stopping it", run_id)
        stop_run(client, run_id)
    return stale
