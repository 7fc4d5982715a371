"""The Fleet signature check before the body, against Flower's own check and a real ASGI app."""

from __future__ import annotations

import asyncio
import datetime
import json
from base64 import b64decode, b64encode
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import HTTPException
from flwr.proto.fleet_pb2 import ActivateNodeRequest
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import (
    generate_key_pairs,
    public_key_to_bytes,
    sign_message,
)
from flwr.superlink.routers.fleet.node_auth import authenticate_node
from starlette.requests import Request

from fedmed.flower.node_gate import UNREGISTERED_BODY_BYTES, NodeGate, signed_public_key
from fedmed.flower.port_limits import REFUSE_EXTENSION

PUBLIC, PRIVATE = 9092, 9093
SITE = generate_key_pairs()
STRANGER = generate_key_pairs()
SITE_KEY = public_key_to_bytes(SITE[1])


def _signed(keys: Any = SITE, *, shift_s: float = 0.0, signer: Any = None) -> dict[str, str]:
    public = keys[1]
    timestamp = (now() + datetime.timedelta(seconds=shift_s)).isoformat()
    signature = sign_message((signer or keys)[0], timestamp.encode("ascii"))
    return {
        "flwr-public-key": b64encode(public_key_to_bytes(public)).decode(),
        "flwr-timestamp": timestamp,
        "flwr-signature": b64encode(signature).decode(),
    }


# built when a test runs, not at import: a timestamp signed minutes before the test (a loaded
# machine, a long collection) is no longer "from the future"
HEADER_CASES: dict[str, Callable[[], dict[str, str]]] = {
    "valid": lambda: _signed(),
    "expired": lambda: _signed(shift_s=-400),
    "from-the-future": lambda: _signed(shift_s=60),
    "signed-by-another-key": lambda: _signed(signer=STRANGER),
    "no-signature": lambda: {k: v for k, v in _signed().items() if k != "flwr-signature"},
    "key-not-base64": lambda: {**_signed(), "flwr-public-key": "not base64!"},
    "key-not-pem": lambda: {**_signed(), "flwr-public-key": b64encode(b"junk").decode()},
    "naive-timestamp": lambda: {**_signed(), "flwr-timestamp": "2026-01-01T00:00:00"},
}


def _flower_accepts(headers: dict[str, str]) -> bool:
    """Flower's own authenticate_node on an ActivateNode request for the header's key."""
    scope = {
        "type": "http",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "app": None,
    }
    request = Request(scope)
    claimed = headers.get("flwr-public-key", "")
    try:
        key = b64decode(claimed, validate=True)
    except ValueError:
        key = b""
    request.state.protobuf_request = ActivateNodeRequest(public_key=key)
    try:
        authenticate_node(request)
    except HTTPException as err:
        assert err.status_code == 401
        return False
    return True


def _gate_accepts(headers: dict[str, str]) -> bool:
    try:
        signed_public_key(headers)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_the_gate_accepts_the_headers_flower_accepts(case: str) -> None:
    headers = HEADER_CASES[case]()
    assert _gate_accepts(headers) == _flower_accepts(headers) == (case == "valid")


@dataclass
class Inner:
    """The app behind the gate: records the bodies it read."""

    bodies: list[bytes] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        self.bodies.append(message["body"])
        assert message["more_body"] is False
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@dataclass
class Outcome:
    status: int
    detail: str
    reads: int  # receive() calls the gate made


def _call(
    gate: NodeGate,
    headers: dict[str, str],
    body: bytes = b"",
    *,
    port: int = PUBLIC,
    path: str = "/v1/fleet/pull-messages",
    chunk: int = 1000,
) -> Outcome:
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    reads = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        if reads > len(pieces):
            await asyncio.sleep(3600)  # no more body: the peer waits for the answer
        return {"type": "http.request", "body": pieces[reads - 1], "more_body": reads < len(pieces)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    all_headers = {**headers, "content-length": str(len(body))}
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "server": ("127.0.0.1", port),
        "client": ("203.0.113.9", 5555),
        "headers": [(k.encode(), v.encode()) for k, v in all_headers.items()],
    }
    asyncio.run(gate(scope, receive, send))
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    detail = json.loads(body_out)["detail"] if body_out.startswith(b"{") else body_out.decode()
    return Outcome(sent[0]["status"], detail, reads)


def _gate(inner: Inner, known: set[bytes] | None = frozenset({SITE_KEY}), **kwargs: Any):
    lookups: list[bytes] = []

    def known_key(key: bytes) -> bool:
        lookups.append(key)
        return key in known

    gate = NodeGate(
        inner,
        public_port=PUBLIC,
        max_body_bytes=kwargs.pop("max_body_bytes", 1 << 20),
        known_key=None if known is None else known_key,
    )
    return gate, lookups


def test_an_unauthenticated_request_is_refused_before_its_body_is_read() -> None:
    inner = Inner()
    gate, _ = _gate(inner)

    outcome = _call(gate, HEADER_CASES["expired"](), b"\0" * 500_000)

    assert (outcome.status, outcome.detail) == (401, "Invalid SuperNode authentication")
    assert outcome.reads == 0
    assert inner.bodies == []


def test_a_registered_site_gets_its_whole_body_through_in_one_piece() -> None:
    inner = Inner()
    gate, lookups = _gate(inner)
    body = bytes(range(256)) * 2000  # 512,000 bytes in 512 pieces

    first = _call(gate, _signed(), body)
    second = _call(gate, _signed(), b"x")

    assert (first.status, second.status) == (200, 200)
    assert inner.bodies == [body, b"x"]
    assert lookups == [SITE_KEY]  # the second request used the remembered key


def test_an_unregistered_key_may_send_only_a_small_body() -> None:
    inner = Inner()
    gate, _ = _gate(inner)

    big = _call(gate, _signed(STRANGER), b"\0" * (UNREGISTERED_BODY_BYTES + 1))
    small = _call(gate, _signed(STRANGER), b"\0" * 300, path="/v1/fleet/activate-node")

    assert big.status == 413 and "not registered" in big.detail
    assert big.reads == 0
    assert small.status == 200  # Flower answers it as it always did


def test_a_registered_site_is_held_to_the_port_limit() -> None:
    gate, _ = _gate(Inner(), max_body_bytes=4096)
    assert _call(gate, _signed(), b"\0" * 4097).status == 413


def test_a_failing_key_lookup_answers_503_so_the_site_retries() -> None:
    def broken(key: bytes) -> bool:
        raise RuntimeError("database is locked")

    gate = NodeGate(Inner(), public_port=PUBLIC, max_body_bytes=1 << 20, known_key=broken)
    outcome = _call(gate, _signed(), b"x")
    assert (outcome.status, outcome.detail) == (503, "RuntimeError: database is locked")


def test_without_site_authentication_only_the_size_limit_applies() -> None:
    inner = Inner()
    gate, _ = _gate(inner, known=None, max_body_bytes=4096)

    assert _call(gate, {}, b"\0" * 4096).status == 200
    assert _call(gate, {}, b"\0" * 4097).status == 413


def test_outside_the_fleet_api_bodies_are_small_and_the_private_port_is_untouched() -> None:
    inner = Inner()
    gate, lookups = _gate(inner)

    health = _call(gate, {}, b"\0" * (UNREGISTERED_BODY_BYTES + 1), path="/health")
    private = _call(gate, {}, b"\0" * 2_000_000, port=PRIVATE, chunk=2_000_000)

    assert (health.status, private.status) == (413, 200)
    assert private.reads == 1 and lookups == []


def test_on_the_limited_port_the_port_itself_answers_a_refusal() -> None:
    # LimitedHttpProtocol offers its refusal (answer, linger, abort) through the scope.
    refusals: list[tuple[int, str, str]] = []
    gate, _ = _gate(Inner())
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/fleet/pull-messages",
        "server": ("127.0.0.1", PUBLIC),
        "client": ("203.0.113.9", 5555),
        "headers": [(b"content-length", b"10")],
        "extensions": {REFUSE_EXTENSION: lambda *args: refusals.append(args)},
    }

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body must not be read")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(gate(scope, receive, send))

    assert refusals == [(401, "unauthenticated request", "Invalid SuperNode authentication")]
    assert sent == []
