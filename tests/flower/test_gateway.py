"""The gateway's public filter, in process, and the flwr internals it builds on (pinned)."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any

import flwr
import httpx
import pytest
import uvicorn
from fedmed.server.gateway import (
    PUBLIC_ROUTES,
    PublicFilter,
    _parse,
    fleet_routes,
    lengthen_sqlite_busy_timeout,
    port_limits,
)

from fedmed.flower.port_limits import PortLimits

PUBLIC_PORT, PRIVATE_PORT = 9092, 9093

FLEET_PATHS = {
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
}


async def _echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = f"{scope['method']} {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _request(port: int, method: str, path: str) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=PublicFilter(_echo, public_port=PUBLIC_PORT))
        async with httpx.AsyncClient(
            transport=transport, base_url=f"https://127.0.0.1:{port}"
        ) as client:
            return await client.request(method, path)

    return asyncio.run(go())


def test_flwr_internals_the_gateway_uses_are_where_they_were() -> None:
    # Fails loudly when a flwr upgrade moves what fedmed.server.gateway builds on.
    assert flwr.__version__.startswith("1.41."), flwr.__version__
    cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
    assert callable(cli._parse_superlink_lifespan_config)
    assert inspect.isclass(cli.SuperLinkLifespan)
    from flwr.superlink.main import create_app

    assert list(inspect.signature(create_app).parameters) == [
        "config",
        "superlink_lifespan_class",
    ]
    assert "sockets" in inspect.signature(uvicorn.Server.run).parameters
    # The executor connects to the SuperLink's --host/--port: that must stay the private socket.
    assert "runtime_address" in inspect.getsource(cli.SuperLinkLifespan._start_superexec_if_needed)


def test_sqlite_busy_timeout_is_lengthened_where_flower_reads_it(monkeypatch) -> None:
    sql_mixin = importlib.import_module("flwr.supercore.sql_mixin")
    assert ("busy_timeout", "5000") in sql_mixin.SQLITE_PRAGMAS
    # Flower reads the module global at connect time: that is what the gateway replaces.
    assert "SQLITE_PRAGMAS" in inspect.getsource(sql_mixin._set_sqlite_pragmas)
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)

    lengthen_sqlite_busy_timeout("60000")

    assert dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"] == "60000"
    assert dict(sql_mixin.SQLITE_PRAGMAS)["journal_mode"] == "WAL"


def test_public_routes_are_exactly_the_fleet_api_and_health() -> None:
    assert {path for _, path in fleet_routes()} == FLEET_PATHS
    assert {method for method, _ in fleet_routes()} == {"POST"}
    assert fleet_routes() | {("GET", "/health")} == PUBLIC_ROUTES


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/runtime/pull-messages"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("POST", "/v1/fleet/%2e%2e/control/start-run"),
        ("POST", "/v1/fleet/get-run/"),
        ("GET", "/v1/fleet/get-run"),
        ("POST", "/health"),
    ],
)
def test_public_port_answers_404_outside_the_fleet_api(method: str, path: str) -> None:
    response = _request(PUBLIC_PORT, method, path)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/fleet/get-run"), ("GET", "/health")])
def test_public_port_passes_the_fleet_api(method: str, path: str) -> None:
    response = _request(PUBLIC_PORT, method, path)
    assert (response.status_code, response.text) == (200, f"{method} {path}")


def test_private_port_passes_everything() -> None:
    response = _request(PRIVATE_PORT, "POST", "/v1/control/start-run")
    assert (response.status_code, response.text) == (200, "POST /v1/control/start-run")


def test_a_request_without_a_known_socket_counts_as_public() -> None:
    assert PublicFilter(_echo, public_port=PUBLIC_PORT).is_public({"type": "http"})


def test_gateway_flags_are_split_from_flower_flags() -> None:
    args, rest = _parse(
        ["--public-host", "0.0.0.0", "--public-port", "9092", "--", "--host", "127.0.0.1"]
    )
    assert (args.public_host, args.public_port, rest) == ("0.0.0.0", 9092, ["--host", "127.0.0.1"])
    assert port_limits(args) == PortLimits()  # no limit flag: the documented defaults


def test_a_limit_that_is_not_positive_stops_the_gateway() -> None:
    args, _ = _parse(["--public-host", "h", "--public-port", "1", "--max-connections", "0"])
    with pytest.raises(SystemExit, match=r"PortLimits.max_connections = 0 must be > 0"):
        port_limits(args)
