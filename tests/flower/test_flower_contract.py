"""The contract between fedmed and Flower: every private symbol and behaviour that
``fedmed/flower/`` relies on, asserted on the installed flwr.

Run it on each flwr series in ``fedmed.flower.version.SUPPORTED_SERIES`` before claiming it
(README, "Testing on another Flower"). A failure names what moved; fix the module named in the
test's comment, or keep the version out of the supported range.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import pytest


def _module(name: str) -> ModuleType:
    with warnings.catch_warnings():
        # flwr.cli imports typer, which touches a click API deprecated since click 8.2.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="typer")
        return importlib.import_module(name)


def _parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


# (module, attribute) fedmed/flower imports or patches, by the fedmed module that does
SYMBOLS = [
    # codes.py
    ("flwr.common.constant", "ErrorCode"),
    ("flwr.common.constant", "SType"),
    # control.py
    ("flwr.cli.typing", "SuperLinkConnection"),
    ("flwr.cli.utils", "init_http_client_from_connection"),
    ("flwr.common.constant", "Status"),
    ("flwr.common.constant", "SubStatus"),
    ("flwr.common.serde", "fab_to_proto"),
    ("flwr.common.serde", "run_from_proto"),
    ("flwr.common.serde", "user_config_to_proto"),
    ("flwr.proto.control_pb2", "ListNodesRequest"),
    ("flwr.proto.control_pb2", "ListRunsRequest"),
    ("flwr.proto.control_pb2", "RegisterNodeRequest"),
    ("flwr.proto.control_pb2", "StartRunRequest"),
    ("flwr.proto.control_pb2", "StopRunRequest"),
    ("flwr.proto.control_pb2", "StreamLogsRequest"),
    ("flwr.proto.federation_config_pb2", "SimulationConfig"),
    ("flwr.supercore.control", "ControlHttpClient"),
    # fab.py
    ("flwr.cli.build", "build_fab_from_files"),
    ("flwr.supercore.fab", "Fab"),
    # fastpoll.py
    ("flwr.supernode.start_client_internal", "time"),
    ("flwr.supercore.inflatable.inflatable_utils", "pull_objects"),
    ("flwr.supercore.inflatable.inflatable_utils", "pull_and_inflate_object_from_tree"),
    ("flwr.supernode.cli", "flower_supernode"),
    # liveness.py
    ("flwr.supernode.fleet_http_connection", "HEARTBEAT_DEFAULT_INTERVAL"),
    ("flwr.supercore.heartbeat", "HEARTBEAT_DEFAULT_INTERVAL"),
    ("flwr.common.constant", "HEARTBEAT_MIN_INTERVAL"),
    ("flwr.common.constant", "HEARTBEAT_MAX_INTERVAL"),
    # pinning.py, warmstart.py
    ("flwr.supernode.runtime.run_clientapp", "run_clientapp"),
    ("flwr.supernode.runtime.run_clientapp", "pull_task_input"),
    ("flwr.supernode.runtime.run_clientapp", "install_from_fab"),
    ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp"),
    ("flwr.supercore.constant", "TASK_TYPE_TO_COMMAND"),
    ("flwr.supercore.constant", "TaskType"),
    # gateway.py
    ("flwr.superlink.cli.flower_superlink", "_parse_superlink_lifespan_config"),
    ("flwr.superlink.cli.flower_superlink", "SuperLinkLifespan"),
    ("flwr.superlink.main", "create_app"),
    ("flwr.supercore.http_logging", "get_uvicorn_log_config"),
    ("flwr.supercore.logger", "console_handler"),
    # linkstate.py
    ("flwr.supercore.sql_mixin", "SQLITE_PRAGMAS"),
    ("flwr.supercore.sql_mixin", "_set_sqlite_pragmas"),
    ("flwr.server.superlink.linkstate.sql_linkstate", "SqlLinkState"),
    ("flwr.supercore.state.schema.linkstate_models", "MessageIns"),
    ("flwr.supercore.state.schema.linkstate_models", "MessageRes"),
    ("flwr.supercore.state.schema.objectstore_models", "StoredObject"),
    ("flwr.supercore.state.schema.objectstore_models", "ObjectChild"),
    ("flwr.supercore.utils", "uint64_to_int64"),
    # node_gate.py
    ("flwr.common.constant", "SYSTEM_TIME_TOLERANCE"),
    ("flwr.common.constant", "TIMESTAMP_HEADER"),
    ("flwr.common.constant", "TIMESTAMP_TOLERANCE"),
    ("flwr.supercore.constant", "FLEET_HTTP_PUBLIC_KEY_HEADER"),
    ("flwr.supercore.constant", "FLEET_HTTP_SIGNATURE_HEADER"),
    ("flwr.supercore.date", "now"),
    ("flwr.supercore.primitives.asymmetric", "bytes_to_public_key"),
    ("flwr.supercore.primitives.asymmetric", "verify_signature"),
    # public_filter.py
    ("flwr.superlink.routers.fleet.router", "router"),
    ("flwr.superlink.routers.control.router", "router"),
    # secaggplus.py
    ("flwr.compat.common.recorddict_compat", "recorddict_to_fitins"),
    ("flwr.compat.common.recorddict_compat", "fitres_to_recorddict"),
    ("flwr.client.mod", "secaggplus_mod"),
    ("flwr.common", "Code"),
    ("flwr.common", "FitIns"),
    ("flwr.common", "FitRes"),
    ("flwr.common", "Parameters"),
    ("flwr.common", "Status"),
    ("flwr.common", "ndarrays_to_parameters"),
    ("flwr.common", "parameters_to_ndarrays"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "RECORD_KEY_CONFIGS"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "RECORD_KEY_STATE"),
    ("flwr.server.client_manager", "ClientManager"),
    ("flwr.server.client_proxy", "ClientProxy"),
    ("flwr.server.compat.grid_client_proxy", "GridClientProxy"),
    ("flwr.server.compat.legacy_context", "LegacyContext"),
    ("flwr.server.strategy", "Strategy"),
    ("flwr.server.workflow", "SecAggPlusWorkflow"),
    ("flwr.server.workflow.constant", "MAIN_CONFIGS_RECORD"),
    ("flwr.server.workflow.constant", "MAIN_PARAMS_RECORD"),
    ("flwr.server.workflow.constant", "Key"),
]


@pytest.mark.parametrize(("module", "name"), SYMBOLS, ids=[f"{m}.{n}" for m, n in SYMBOLS])
def test_every_flower_symbol_fedmed_uses_exists(module: str, name: str) -> None:
    assert hasattr(_module(module), name), f"{module}.{name} is gone"


def test_installed_flower_is_a_supported_version() -> None:
    from fedmed.flower.version import check_flower_version

    check_flower_version()


def test_protocol_constants_have_the_values_on_the_wire() -> None:
    # codes.py (wire.py writes them into messages), control.py
    from flwr.common.constant import ErrorCode, Status, SType, SubStatus

    assert SType.NUMPY == "numpy.ndarray"
    assert isinstance(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, int)
    assert (Status.FINISHED, SubStatus.COMPLETED) == ("finished", "completed")


def test_control_api_client_and_messages_take_what_control_py_sends() -> None:
    control_pb2 = _module("flwr.proto.control_pb2")
    client = _module("flwr.supercore.control").ControlHttpClient
    for method in ("RegisterNode", "ListNodes", "StartRun", "ListRuns", "StopRun", "StreamLogs"):
        assert callable(getattr(client, method)), method
    assert callable(client.close)
    fields = {
        "RegisterNodeRequest": {"public_key", "name"},
        "StartRunRequest": {"fab", "override_config", "federation", "override_federation_config"},
        "ListRunsRequest": {"run_id"},
        "StopRunRequest": {"run_id"},
        "StreamLogsRequest": {"run_id", "after_timestamp"},
        "RegisterNodeResponse": {"node_id"},
        "StartRunResponse": {"run_id", "note"},
        "ListRunsResponse": {"run_dict"},
        "ListNodesResponse": {"nodes_info"},
        "StreamLogsResponse": {"log_output"},
    }
    for message, names in fields.items():
        declared = {f.name for f in getattr(control_pb2, message).DESCRIPTOR.fields}
        assert names <= declared, f"{message} lacks {names - declared}"
    node_info = _module("flwr.proto.node_pb2").NodeInfo.DESCRIPTOR.fields
    assert {"name", "node_id", "status"} <= {f.name for f in node_info}
    simulation = _module("flwr.proto.federation_config_pb2").SimulationConfig.DESCRIPTOR.fields
    assert {
        "num_supernodes",
        "client_resources_num_cpus",
        "client_resources_num_gpus",
        "init_args_num_cpus",
        "init_args_num_gpus",
        "init_args_log_to_driver",
        "init_args_logging_level",
    } <= {f.name for f in simulation}
    connection = _parameters(_module("flwr.cli.typing").SuperLinkConnection)
    assert {"name", "address", "root_certificates", "insecure"} <= set(connection)
    assert _parameters(_module("flwr.cli.utils").init_http_client_from_connection)[0] == (
        "connection"
    )


def test_fab_build_and_type_are_what_fab_py_calls() -> None:
    assert _parameters(_module("flwr.cli.build").build_fab_from_files) == ["files"]
    assert _parameters(_module("flwr.supercore.fab").Fab) == [
        "hash_str",
        "content",
        "verifications",
    ]


def test_supernode_loop_sleeps_through_its_module_level_time() -> None:
    # fastpoll.py replaces the module's `time` to cap the idle poll (a hard-coded 3 s)
    module = _module("flwr.supernode.start_client_internal")
    assert module.time is time or type(module.time).__name__ == "CappedSleep"
    assert "time.sleep(3)" in inspect.getsource(module)


def test_object_pull_backoff_is_in_keyword_defaults() -> None:
    # fastpoll.py rewrites these keyword defaults (Flower: 1 s doubling to 10 s)
    utils = _module("flwr.supercore.inflatable.inflatable_utils")
    for function in (utils.pull_objects, utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__
        assert {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(defaults)
        assert (defaults["initial_backoff"], defaults["backoff_cap"]) in ((1, 10), (0.05, 0.5))


def test_heartbeat_bounds_and_module_constants() -> None:
    # liveness.py rebinds HEARTBEAT_DEFAULT_INTERVAL in both modules, within these bounds
    from fedmed.flower import liveness

    constant = _module("flwr.common.constant")
    assert (constant.HEARTBEAT_MIN_INTERVAL, constant.HEARTBEAT_MAX_INTERVAL) == (
        liveness.MIN_HEARTBEAT_S,
        liveness.MAX_HEARTBEAT_S,
    )
    for name in liveness.HEARTBEAT_MODULES:
        assert isinstance(_module(name).HEARTBEAT_DEFAULT_INTERVAL, (int, float)), name


def test_clientapp_is_launched_by_name_through_path_and_runs_the_guarded_hooks() -> None:
    # pinning.py: the wrapper is found through PATH, and run_clientapp calls the hooks by name
    from fedmed.flower.pinning import WRAPPED_COMMAND, check_runtime_hooks

    constant = _module("flwr.supercore.constant")
    assert constant.TASK_TYPE_TO_COMMAND[constant.TaskType.CLIENT_APP] == WRAPPED_COMMAND
    executor = _module("flwr.supercore.superexec.executor.subprocess_executor")
    assert "TASK_TYPE_TO_COMMAND[spec.task_type]" in inspect.getsource(executor)
    check_runtime_hooks()
    runtime = _module("flwr.supernode.runtime.run_clientapp")
    assert _parameters(runtime.install_from_fab)[0] == "fab_file"
    assert _parameters(runtime.pull_task_input) == ["client"]
    source = inspect.getsource(runtime.run_clientapp)
    # the check runs after the task was pulled and inside the try that turns it into a reply
    assert source.index("try:") < source.index("pull_task_input(")
    assert source.index("pull_task_input(") < source.index("install_from_fab(")
    assert source.index("install_from_fab(") < source.index("except Exception")


def test_flower_commands_the_processes_start_are_installed() -> None:
    # process.py puts this interpreter's bin first on PATH for these
    bin_dir = Path(sys.executable).parent
    for command in (
        "flower-superlink",
        "flower-supernode",
        "flower-superexec",
        "flwr-serverapp",
        "flwr-clientapp",
        "flwr-simulation",
    ):
        assert shutil.which(command, path=str(bin_dir)), command


def test_superlink_app_is_built_as_the_gateway_builds_it() -> None:
    # gateway.py builds Flower's SuperLink app itself and serves it on two sockets
    import uvicorn

    cli = _module("flwr.superlink.cli.flower_superlink")
    assert callable(cli._parse_superlink_lifespan_config)
    assert inspect.isclass(cli.SuperLinkLifespan)
    create_app = _module("flwr.superlink.main").create_app
    assert _parameters(create_app) == ["config", "superlink_lifespan_class"]
    assert "linkstate_factory" in inspect.getsource(create_app)  # node_gate's key lookup
    assert "sockets" in inspect.signature(uvicorn.Server.run).parameters
    # The executor connects to the SuperLink's --host/--port: that must stay the private socket.
    assert "runtime_address" in inspect.getsource(cli.SuperLinkLifespan._start_superexec_if_needed)
    config = _module("flwr.superlink.cli.flower_superlink").SuperLinkLifespanConfig
    names = {f.name for f in dataclasses.fields(config)}
    assert {"host", "port", "enable_supernode_auth", "ssl_keyfile", "ssl_certfile"} <= names


def test_sql_state_is_what_linkstate_py_patches() -> None:
    sql_mixin = _module("flwr.supercore.sql_mixin")
    assert dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"] in ("5000", "60000")
    assert "SQLITE_PRAGMAS" in inspect.getsource(sql_mixin._set_sqlite_pragmas)
    state = _module("flwr.server.superlink.linkstate.sql_linkstate").SqlLinkState
    ins = state.get_message_ins
    res = state.get_message_res
    ins = getattr(ins, "__wrapped__", ins)
    res = getattr(res, "__wrapped__", res)
    assert _parameters(ins) == ["self", "node_id", "limit", "run_id"]
    assert inspect.signature(ins).parameters["run_id"].kind is inspect.Parameter.KEYWORD_ONLY
    assert _parameters(res) == ["self", "message_ids", "run_id"]
    for name in ("session", "object_store", "get_node_id_by_public_key"):
        assert hasattr(state, name), name
    models = _module("flwr.supercore.state.schema.linkstate_models")
    columns = {
        "message_id",
        "dst_node_id",
        "delivered_at",
        "created_at",
        "ttl",
        "run_id",
        "reply_to_message_id",
    }
    assert columns <= set(models.MessageIns.__table__.columns.keys())
    assert columns <= set(models.MessageRes.__table__.columns.keys())
    objects = _module("flwr.supercore.state.schema.objectstore_models")
    assert {"object_id", "is_available"} <= set(objects.StoredObject.__table__.columns.keys())
    assert {"parent_id", "child_id"} <= set(objects.ObjectChild.__table__.columns.keys())


def test_fleet_and_control_routers_are_separate() -> None:
    # public_filter.py serves exactly the fleet router's routes on the public socket
    from fedmed.flower.public_filter import FLEET_PREFIX, control_routes, fleet_routes

    assert all(path.startswith(FLEET_PREFIX) for _, path in fleet_routes())
    assert control_routes() and not fleet_routes() & control_routes()


def test_secaggplus_legacy_path_takes_what_secaggplus_py_passes() -> None:
    workflow = _module("flwr.server.workflow").SecAggPlusWorkflow
    init = inspect.signature(workflow.__init__).parameters
    for name in (
        "num_shares",
        "reconstruction_threshold",
        "max_weight",
        "clipping_range",
        "quantization_range",
        "timeout",
    ):
        assert name in init, name
    assert _parameters(workflow.collect_masked_vectors_stage) == [
        "self",
        "grid",
        "context",
        "state",
    ]
    state = _module("flwr.server.workflow.secure_aggregation.secaggplus_workflow").WorkflowState
    assert "active_node_ids" in {f.name for f in dataclasses.fields(state)}
    proxy = _module("flwr.server.compat.grid_client_proxy").GridClientProxy
    assert _parameters(proxy) == ["node_id", "grid", "run_id"]
    legacy = _module("flwr.server.compat.legacy_context").LegacyContext
    assert {"context", "strategy"} <= set(_parameters(legacy))
    compat = _module("flwr.compat.common.recorddict_compat")
    assert _parameters(compat.recorddict_to_fitins) == ["recorddict", "keep_input"]
    assert _parameters(compat.fitres_to_recorddict) == ["fitres", "keep_input"]
    assert _parameters(_module("flwr.client.mod").secaggplus_mod) == ["msg", "ctxt", "call_next"]
    key = _module("flwr.server.workflow.constant").Key
    assert hasattr(key, "CURRENT_ROUND")
    strategy = _module("flwr.server.strategy").Strategy
    assert {
        "initialize_parameters",
        "configure_fit",
        "aggregate_fit",
        "configure_evaluate",
        "aggregate_evaluate",
        "evaluate",
    } == set(strategy.__abstractmethods__)


def test_uvicorn_protocol_is_what_port_limits_py_subclasses() -> None:
    httptools_impl = _module("uvicorn.protocols.http.httptools_impl")
    protocol = httptools_impl.HttpToolsProtocol
    for name in ("connection_made", "connection_lost", "data_received"):
        assert callable(getattr(protocol, name)), name
    assert isinstance(httptools_impl.STATUS_LINE, dict)


def test_every_speedup_applies_here_without_a_drift_warning(monkeypatch) -> None:
    # fastpoll.py, liveness.py, linkstate.py, warmstart.py: each checks Flower before it
    # patches and switches off with a FlowerDriftWarning (an error here) where Flower changed.
    from fedmed.flower import fastpoll, linkstate, liveness, speedups, warmstart

    monkeypatch.setattr(speedups, "_OFF", {})
    monkeypatch.delenv(speedups.WITHOUT_ENV, raising=False)
    supernode = _module(fastpoll.SUPERNODE_MODULE)
    monkeypatch.setattr(supernode, "time", supernode.time)
    pulls = [getattr(_module(fastpoll.INFLATABLE_MODULE), n) for n in fastpoll.PULL_FUNCTIONS]
    saved = [dict(f.__kwdefaults__) for f in pulls]
    for name in liveness.HEARTBEAT_MODULES:
        module = _module(name)
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)
    sql_mixin = _module(linkstate.SQL_MIXIN)
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    try:
        assert fastpoll.cap_supernode_sleep(0.5) is supernode
        assert fastpoll.shorten_pull_backoff()
        assert len(liveness.set_heartbeat_interval(10.0)) == len(liveness.HEARTBEAT_MODULES)
        assert linkstate.lengthen_sqlite_busy_timeout()
    finally:
        for function, defaults in zip(pulls, saved, strict=True):
            function.__kwdefaults__.update(defaults)
    assert speedups.off() == {}
    # warm start forks only from a single thread: importing what it preloads starts none
    code = f"import importlib, threading\nfor m in {warmstart.PRELOAD}: importlib.import_module(m)"
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\nprint(threading.active_count())"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert result.stdout.split()[-1] == "1", result.stdout
