"""The public port under attack by an unauthenticated peer: a real gateway (TLS, site
authentication, sites A and B registered) on 127.0.0.1.

Each attack of the security review (``port_attacks``): it is refused or closed, the RSS of the
process serving the port grows by less than 64 MiB, and the port keeps serving ``/health`` to
another peer (127.0.0.2) and a registered site's real Flower requests.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from port_attacks import (
    MIB,
    client_context,
    connect,
    health,
    huge_header,
    idle_holders,
    oversized_body,
    slow_trickle,
)

pytestmark = pytest.mark.slow

# Short deadlines keep the slow attacks short; the body limit is small so that a registered
# site's oversized request is cheap to send.
LIMITS = {
    "public_header_timeout_s": 1.0,
    "public_request_timeout_s": 3.0,
    "public_max_body_mib": 8,
}
GROWTH = 64 * MIB
# A request refused by the port's limits (413, 408), by the signature check before the body
# (401), or a connection closed before its answer could be read.
REFUSED = {
    "HTTP/1.1 401 Unauthorized",
    "HTTP/1.1 408 Request Timeout",
    "HTTP/1.1 413 Request Entity Too Large",
    "closed",
}


@dataclass
class Port:
    port: int
    pid: int
    ca: Path
    site_key: Path  # site A's private key (registered)
    private: str  # the private socket's address
    sites: dict[str, Path]  # registered site -> public key
    node_id: int = 0  # site A's, once activated


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Port]:
    from port_attacks import gateway

    with gateway(tmp_path_factory.mktemp("limits"), **LIMITS) as (link, pki):
        yield Port(
            link.config.port,
            link.proc.pid,
            pki.ca_cert,
            pki.site_private_keys["A"],
            link.address,
            link.config.sites,
            _activate_site(link.config.port, pki.ca_cert, pki.site_private_keys["A"]),
        )


def _site_key(path: Path) -> Any:
    return serialization.load_ssh_private_key(path.read_bytes(), password=None)


def _site_client(port: int, ca: Path, site_key: Path) -> Any:
    """Flower's own Fleet HTTP client, signing as the site (what a SuperNode sends)."""
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    private = _site_key(site_key)
    return FleetHttpClient.from_server_address(
        f"127.0.0.1:{port}",
        False,
        ca.read_bytes(),
        interceptors=[NodeAuthHttpInterceptor(private, private.public_key())],
    )


def _activate_site(port: int, ca: Path, site_key: Path) -> int:
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    public_key = public_key_to_bytes(_site_key(site_key).public_key())
    with _site_client(port, ca, site_key) as client:
        request = ActivateNodeRequest(public_key=public_key, heartbeat_interval=600.0)
        return client.ActivateNode(request).node_id


def _site_is_served(port: Port) -> None:
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.proto.node_pb2 import Node

    node = Node(node_id=port.node_id)
    with _site_client(port.port, port.ca, port.site_key) as client:
        beat = client.SendNodeHeartbeat(
            SendNodeHeartbeatRequest(node=node, heartbeat_interval=600.0)
        )
        pulled = client.PullMessages(PullMessagesRequest(node=node))
    assert beat.success
    assert list(pulled.messages_list) == []  # no run: nothing to do, but served


def _keeps_serving(port: Port) -> None:
    assert health(port.port, port.ca) == 200
    _site_is_served(port)


def test_a_registered_site_is_served_through_the_limits(port: Port) -> None:
    _keeps_serving(port)


def test_an_unauthenticated_256_mb_body_is_refused_before_it_is_read(port: Port) -> None:
    outcome = oversized_body(port.port, port.pid, port.ca, size=256_000_000)

    assert outcome.answers[0] in REFUSED, outcome.row()
    assert outcome.growth < GROWTH, outcome.row()
    _keeps_serving(port)


def test_an_unauthenticated_body_under_the_size_limit_is_not_read(port: Port) -> None:
    outcome = oversized_body(port.port, port.pid, port.ca, size=7 * MIB)
    assert outcome.answers == ["HTTP/1.1 401 Unauthorized"], outcome.row()


def test_four_idle_connections_pushing_100_mb_each_hold_no_memory(port: Port) -> None:
    outcome = idle_holders(port.port, port.pid, port.ca, count=4, each=100_000_000, hold_s=1.0)

    assert set(outcome.answers) <= REFUSED, outcome.row()
    assert outcome.growth < GROWTH, outcome.row()
    _keeps_serving(port)


def test_an_8_mb_header_is_refused(port: Port) -> None:
    outcome = huge_header(port.port, port.pid, port.ca, size=8 * MIB)

    assert outcome.answers[0] in ("HTTP/1.1 431 Request Header Fields Too Large", "closed")
    assert outcome.growth < GROWTH, outcome.row()
    _keeps_serving(port)


def test_100_slow_trickles_are_all_answered_and_closed(port: Port) -> None:
    # 32 are admitted (the per-peer limit) and cut off at the 1 s header deadline, the others
    # are refused at once; none is still open when the attack gives up after 30 s.
    # From an address of its own: no other test's connection shares its per-peer count.
    outcome = slow_trickle(port.port, port.pid, port.ca, count=100, seconds=30, source="127.0.0.9")

    counts = {answer: outcome.answers.count(answer) for answer in set(outcome.answers)}
    assert counts == {
        "HTTP/1.1 408 Request Timeout": 32,
        "HTTP/1.1 503 Service Unavailable": 68,
    }, outcome.row()
    assert outcome.growth < GROWTH, outcome.row()
    _keeps_serving(port)


def test_a_registered_site_is_held_to_the_body_limit(port: Port) -> None:
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    key = _site_key(port.site_key)
    timestamp = now().isoformat()
    signed = (
        f"flwr-public-key: {b64encode(public_key_to_bytes(key.public_key())).decode()}\r\n"
        f"flwr-timestamp: {timestamp}\r\n"
        f"flwr-signature: {b64encode(sign_message(key, timestamp.encode())).decode()}\r\n"
    )
    with connect(port.port, client_context(port.ca)) as sock:
        sock.sendall(
            (
                f"POST /v1/fleet/push-object HTTP/1.1\r\nhost: 127.0.0.1\r\n{signed}"
                f"content-length: {8 * MIB + 1}\r\n\r\n"
            ).encode()
        )
        sock.settimeout(10)
        reply = sock.recv(4096)

    assert reply.startswith(b"HTTP/1.1 413 "), reply
    assert b"public-max-body-mib" in reply


def test_the_private_socket_keeps_serving_the_control_api(port: Port) -> None:
    from fedmed.server.submit import register_sites

    from fedmed.flower.control import control_client

    with control_client(port.private, ca_cert=port.ca) as control:
        assert register_sites(control, port.sites) == {"A": None, "B": None}  # known already
