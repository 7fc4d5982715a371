"""Flower's Control API from Python: the calls ``flwr run``, ``flwr ls`` and ``flwr supernode``
make, without the CLI.

A SuperLink's Control API takes run submissions and site key registrations. Flower offers it
only through its CLI, so this module makes the same calls through Flower's internal client
(``flwr.cli.utils.init_http_client_from_connection``) and protobuf messages (``StartRun``,
``ListRuns``, ``StopRun``, ``StreamLogs``, ``ListNodes``, ``RegisterNode``). The functions
return plain Python values and let ``httpx.HTTPError`` through: what an error means is the
caller's business (:mod:`fedmed.server.submit`, :mod:`fedmed.simulation.engine`).

Uses Flower internals; ``tests/flower/test_flower_contract.py`` checks them and the e2e tests use
every call against a real SuperLink.

Example:
    >>> with control_client("127.0.0.1:9093", ca_cert=None) as client:
    ...     run_id, note = start_run(client, fab, {"num-rounds": 2})
    ...     run_statuses(client, run_id)[run_id]
    ('running', '')
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

with warnings.catch_warnings():
    # flwr.cli imports typer, which touches a click API deprecated since click 8.2.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="typer")
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
    from flwr.proto.federation_config_pb2 import SimulationConfig
    from flwr.supercore.control import ControlHttpClient

from fedmed.flower.fab import Fab

__all__ = [
    "COMPLETED",
    "FINISHED",
    "ONLINE",
    "ControlHttpClient",
    "control_client",
    "online_nodes",
    "register_node",
    "run_statuses",
    "simulation_config",
    "start_run",
    "stop_run",
    "stream_logs",
]

FINISHED: str = Status.FINISHED  # a run's status once it ended, whatever the outcome
COMPLETED: str = SubStatus.COMPLETED  # the sub-status of a run that ended well
ONLINE = "online"  # a node's status while it heartbeats


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


def register_node(client: ControlHttpClient, public_key: bytes, name: str) -> int:
    """Register a site's public key (PEM bytes) under ``name``; return its node id.

    Raises:
        httpx.HTTPStatusError: refused; 412 with "already" in the text when it is registered.
    """
    return int(client.RegisterNode(RegisterNodeRequest(public_key=public_key, name=name)).node_id)


def online_nodes(client: ControlHttpClient) -> dict[str, int]:
    """Registered names (the node id as text for unnamed ones) -> node id of online nodes."""
    response = client.ListNodes(ListNodesRequest())
    return {
        (node.name or str(node.node_id)): node.node_id
        for node in response.nodes_info
        if node.status == ONLINE
    }


def start_run(
    client: ControlHttpClient,
    fab: Fab,
    override_config: Mapping[str, Any],
    *,
    federation_config: SimulationConfig | None = None,
) -> tuple[int | None, str]:
    """Submit ``fab`` as a new run; return (run id, or None when not started, and the note)."""
    extra = {} if federation_config is None else {"override_federation_config": federation_config}
    request = StartRunRequest(
        fab=fab_to_proto(fab),
        override_config=user_config_to_proto(dict(override_config)),
        federation="",
        **extra,
    )
    response = client.StartRun(request)
    if not response.HasField("run_id"):
        return None, response.note
    return int(response.run_id), response.note


def run_statuses(
    client: ControlHttpClient, run_id: int | None = None
) -> dict[int, tuple[str, str]]:
    """Run id -> (``status:sub-status`` or ``status``, details), of one run or of all."""
    request = ListRunsRequest() if run_id is None else ListRunsRequest(run_id=run_id)
    out = {}
    for key, proto in client.ListRuns(request).run_dict.items():
        run = run_from_proto(proto)
        status = run.status.status
        if run.status.sub_status:
            status = f"{status}:{run.status.sub_status}"
        out[int(key)] = (status, run.status.details)
    return out


def stop_run(client: ControlHttpClient, run_id: int) -> None:
    """Ask the SuperLink to stop a run (``httpx.HTTPError`` when it cannot)."""
    client.StopRun(StopRunRequest(run_id=run_id))


def stream_logs(client: ControlHttpClient, run_id: int) -> Iterator[str]:
    """The run's log, piece by piece, until the run ends (or the stream breaks)."""
    for response in client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
        yield response.log_output


def simulation_config(
    *,
    num_supernodes: int,
    num_cpus: float,
    num_gpus: float,
    ray_cpus: int | None,
    verbose: bool,
) -> SimulationConfig:
    """The ``override_federation_config`` of a simulation run (``flwr run --federation-config
    "num-supernodes=N client-resources-num-cpus=..."``). ``ray_cpus`` None: Ray joins an
    existing cluster (``RAY_ADDRESS``), whose resources it may not set."""
    config = SimulationConfig(
        num_supernodes=num_supernodes,
        client_resources_num_cpus=num_cpus,
        client_resources_num_gpus=num_gpus,
        init_args_log_to_driver=verbose,
        init_args_logging_level="INFO" if verbose else "WARNING",
    )
    if ray_cpus is not None:
        config.init_args_num_cpus = ray_cpus
        if num_gpus == 0:
            config.init_args_num_gpus = 0
    return config
