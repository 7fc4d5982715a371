"""Talk to a SuperLink's Control API: register site keys, build the app, submit and follow a run.

This uses Flower internals (the same calls ``flwr run`` and ``flwr supernode register`` make
in flwr 1.41: ``init_http_client_from_connection``, ``build_fab_from_files``, ``StartRun``,
``ListRuns``, ``ListNodes``, ``RegisterNode``, ``StreamLogs``); flwr is pinned to 1.41 and
``tests/server/test_superlink_e2e.py`` exercises every one of them against a real SuperLink.

The app shipped to the sites (the FAB) is a thin shim built in memory: a ``pyproject.toml``
declaring every run-config key with fedmed's defaults and two modules that import the installed
fedmed's apps, so every site runs the fedmed it installed. It holds nothing per run: the run's
values travel as Flower's ``override_config``, so the FAB's bytes (and sha256, which sites pin,
see ``fedmed.client.pinning``) depend only on the fedmed version and the two module names.

Example:
    >>> with control_client(link.address, ca_cert=ca) as client:
    ...     register_sites(client, {"A": Path("certs/siteA.pub")})
    ...     run_id = submit_run(client, build_fab(), run_config={"num-rounds": 2})
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

with warnings.catch_warnings():
    # flwr.cli imports typer, which touches a click API deprecated since click 8.2.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="typer")
    from flwr.cli.build import build_fab_from_files
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.common.constant import Status, SubStatus
    from flwr.common.serde import fab_to_proto, run_from_proto, user_config_to_proto
    from flwr.proto.control_pb2 import (  # pylint: disable=no-name-in-module
        ListNodesRequest,
        ListRunsRequest,
        RegisterNodeRequest,
        StartRunRequest,
        StopRunRequest,
        StreamLogsRequest,
    )
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.fab import Fab

from fedmed.server.settings import RunSettings

from fedmed import __version__
from fedmed.errors import ConfigError, FederationError, SecurityError
from fedmed.security.pki import load_site_public_key_pem

__all__ = [
    "APP_NAME",
    "APP_PUBLISHER",
    "RunOutcome",
    "build_fab",
    "control_client",
    "default_run_config",
    "fab_files",
    "fab_from_files",
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

APP_NAME = "fedmed-app"
APP_PUBLISHER = "fedmed"
_ONLINE = "online"
SERVER_MODULE = "fedmed.server.app"
CLIENT_MODULE = "fedmed.client.app"
_MAX_POLL_ERRORS = 30  # consecutive failed status polls before giving up on a run
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _shim(target: str) -> bytes:
    """``pkg.mod`` (attribute ``app``) or ``pkg.mod:attr`` -> a module re-exporting it as app."""
    module, _, attr = target.partition(":")
    attr = attr or "app"
    if not _MODULE.match(module) or not attr.isidentifier():
        raise ValueError(f"not a module[:attribute] name: {target!r}")
    alias = "" if attr == "app" else " as app"
    return f'from {module} import {attr}{alias}\n\n__all__ = ["app"]\n'.encode()


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
        return self.status == f"{Status.FINISHED}:{SubStatus.COMPLETED}"


def _toml_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


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
    defaults = default_run_config()
    config_lines = "\n".join(f'"{key}" = {_toml_value(defaults[key])}' for key in sorted(defaults))
    pyproject = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "{__version__}"
description = "fedmed federated segmentation (shim: runs the fedmed installed at each site)"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "{APP_PUBLISHER}"

[tool.flwr.app.components]
serverapp = "fedmed_app.server_app:app"
clientapp = "fedmed_app.client_app:app"

[tool.flwr.app.config]
{config_lines}
"""
    return {
        "pyproject.toml": pyproject.encode(),
        "fedmed_app/__init__.py": b'"""fedmed Flower app shim."""\n',
        "fedmed_app/server_app.py": _shim(server_module),
        "fedmed_app/client_app.py": _shim(client_module),
    }


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


def fab_from_files(files: Mapping[str, bytes]) -> Fab:
    """Zip app files (relative path -> bytes) into a FAB the way ``flwr build`` does."""
    with warnings.catch_warnings():
        # flwr 1.41's build uses pathspec's "gitwildmatch", deprecated in pathspec 0.12.
        warnings.filterwarnings(
            "ignore", message=".*GitWildMatchPattern", category=DeprecationWarning
        )
        fab_bytes, _ = build_fab_from_files(dict(files))
    return Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})


@contextlib.contextmanager
def control_client(address: str, *, ca_cert: Path | None) -> Iterator[ControlHttpClient]:
    """A Control API client for ``address`` (TLS with ``ca_cert``; plain HTTP when None)."""
    connection = SuperLinkConnection(
        name="fedmed",
        address=address,
        root_certificates=str(ca_cert) if ca_cert is not None else None,
        insecure=ca_cert is None,
    )
    client = init_http_client_from_connection(connection)
    try:
        yield client
    finally:
        client.close()


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
            response = client.RegisterNode(
                RegisterNodeRequest(public_key=public_key, name=f"site-{site}")
            )
        except httpx.HTTPStatusError as err:
            # 412 = this key is registered already (registrations persist in the database).
            if err.response.status_code == 412 and "already" in err.response.text.lower():
                log.info("site %s: key already registered", site)
                result[site] = None
                continue
            raise SecurityError(
                f"the SuperLink refused site {site}'s key {key_path}: {_error_text(err)}"
            ) from err
        log.info("site %s registered as node %d", site, response.node_id)
        result[site] = response.node_id
    return result


def online_sites(client: ControlHttpClient) -> dict[str, int]:
    """Registered names -> node id of the sites online now."""
    response = client.ListNodes(ListNodesRequest())
    return {
        (node.name or str(node.node_id)): node.node_id
        for node in response.nodes_info
        if node.status == _ONLINE
    }


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
    request = StartRunRequest(
        fab=fab_to_proto(fab),
        override_config=user_config_to_proto(dict(run_config or {})),
        federation="",
    )
    try:
        response = client.StartRun(request)
    except httpx.HTTPError as err:
        raise FederationError(f"the SuperLink refused the run: {_error_text(err)}") from err
    if not response.HasField("run_id"):
        raise FederationError(f"the SuperLink did not start the run: {response.note}")
    log.info(
        "submitted run %d (app %s, FAB sha256 %s)", response.run_id, APP_NAME, fab.hash_str[:12]
    )
    return response.run_id


def _stream_logs(client: ControlHttpClient, run_id: int, sink: Callable[[str], None]) -> None:
    try:
        for response in client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
            sink(response.log_output)
    except (httpx.HTTPError, ValueError) as err:
        log.debug("log stream of run %d ended: %s", run_id, err)


def run_status(client: ControlHttpClient, run_id: int) -> tuple[str, str]:
    """(``status:sub-status`` or ``status``, details) of a run."""
    response = client.ListRuns(ListRunsRequest(run_id=run_id))
    if run_id not in response.run_dict:
        raise FederationError(f"run {run_id} is unknown to the SuperLink")
    run = run_from_proto(response.run_dict[run_id])
    status = run.status.status
    if run.status.sub_status:
        status = f"{status}:{run.status.sub_status}"
    return status, run.status.details


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
        if status.startswith(Status.FINISHED):
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
        client.StopRun(StopRunRequest(run_id=run_id))
        log.info("run %d stopped", run_id)
    except httpx.HTTPError as err:
        log.warning("could not stop run %d: %s", run_id, _error_text(err))


def stop_unfinished_runs(client: ControlHttpClient) -> list[int]:
    """Stop runs left unfinished by an earlier server session (same database); return their ids.

    A restarted ``fedmed-server`` submits a fresh run that resumes from the checkpoints, so a
    run the crashed session left behind must not compete with it for the sites.
    """
    response = client.ListRuns(ListRunsRequest())
    stale = [
        run_id
        for run_id, proto in response.run_dict.items()
        if run_from_proto(proto).status.status != Status.FINISHED
    ]
    for run_id in stale:
        log.warning("run %d from an earlier session is unfinished: stopping it", run_id)
        stop_run(client, run_id)
    return stale
