"""The gateway's public filter, in process, and its refusal to start when it cannot prove the
public port hides Flower's Control API."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from fedmed.errors import SecurityError
from fedmed.flower import gateway
from fedmed.flower.gateway import _parse, port_limits
from fedmed.flower.port_limits import PortLimits
from fedmed.flower.public_filter import (
    PUBLIC_ROUTES,
    PublicFilter,
    control_routes,
    fleet_routes,
    verify_public_routes,
)

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


def test_the_public_routes_are_proven_to_hide_the_control_api() -> None:
    verify_public_routes(PUBLIC_ROUTES)  # Flower as installed: nothing to refuse
    assert ("POST", "/v1/control/start-run") in control_routes()
    assert not PUBLIC_ROUTES & control_routes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("POST", "/v1/control/start-run"), r"POST /v1/control/start-run, which are Control API"),
        (("GET", "/docs"), r"GET /docs, which lie outside /v1/fleet/"),
    ],
    ids=["control-route", "outside-fleet"],
)
def test_routes_that_drifted_out_of_the_fleet_api_are_refused(
    extra: tuple[str, str], message: str
) -> None:
    with pytest.raises(SecurityError, match=message + r".*under flwr 1\.\d+"):
        verify_public_routes(PUBLIC_ROUTES | {extra})


def test_no_fleet_route_at_all_is_refused() -> None:
    with pytest.raises(SecurityError, match=r"Fleet API router has no /v1/fleet/ route"):
        verify_public_routes(frozenset({("GET", "/health")}))


def test_a_missing_control_router_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    # Simulate a Flower whose control router moved: its import fails.
    monkeypatch.setitem(sys.modules, "flwr.superlink.routers.control.router", None)
    with pytest.raises(SecurityError, match=r"no Control API router where fedmed looks"):
        verify_public_routes(PUBLIC_ROUTES)


GATEWAY_ARGS = ["--public-host", "127.0.0.1", "--public-port", "9", "--", "--insecure"]


def test_gateway_refuses_to_start_when_the_public_port_would_expose_the_control_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Flower whose fleet router (what the public port serves) also holds a control route.
    monkeypatch.setattr(
        gateway, "PUBLIC_ROUTES", PUBLIC_ROUTES | {("POST", "/v1/control/start-run")}
    )
    with pytest.raises(SystemExit, match=r"refusing to start: .*Control API"):
        gateway.main(GATEWAY_ARGS)


def test_gateway_refuses_to_start_on_an_untested_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedmed.flower.version.installed_flower_version", lambda: "1.99.0")
    with pytest.raises(SystemExit, match=r"refusing to start: flwr 1\.99\.0 is installed"):
        gateway.main(GATEWAY_ARGS)
