"""The public port's limits in uvicorn's protocol, on a real uvicorn on 127.0.0.1 (plain HTTP;
tests/server/test_gateway_limits.py runs them over TLS in the real gateway)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from fedmed.flower.port_limits import (
    ConnectionBook,
    LimitedHttpProtocol,
    PortLimits,
    RefusalLog,
    escape,
    limited_protocol,
)

FAST = PortLimits(
    max_body_bytes=1 << 20,
    max_header_bytes=4096,
    header_timeout_s=0.5,
    request_timeout_s=1.5,
    max_connections=6,
    max_connections_per_peer=3,
)


@dataclass
class Served:
    public: int
    private: int
    bodies: list[int | None] = field(default_factory=list)  # per app call; None: disconnected


async def _reading_app(served: Served, scope: dict[str, Any], receive: Any, send: Any) -> None:
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            served.bodies.append(None)
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    served.bodies.append(size)
    if scope["path"] == "/slow":
        await asyncio.sleep(2 * FAST.header_timeout_s)  # answered after the header deadline
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def _bound() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
def serve() -> Iterator[Callable[[PortLimits], Served]]:
    """``serve(limits)``: a uvicorn on a public and a private socket, stopped after the test."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(limits: PortLimits) -> Served:
        public, private = _bound(), _bound()
        served = Served(public.getsockname()[1], private.getsockname()[1])

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await _reading_app(served, scope, receive, send)

        config = uvicorn.Config(
            app,
            http=limited_protocol(limits, public_port=served.public),
            lifespan="off",
            ws="none",
            log_level="warning",
            timeout_keep_alive=5,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [public, private]}, daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started
        servers.append((server, thread))
        return served

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def _reply(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes or goes quiet for ``timeout`` s."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and _complete(data):
                break
    return data


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def _post(length: int, extra: bytes = b"") -> bytes:
    return b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n%s\r\n" % (
        length,
        extra,
    )


def test_uvicorn_protocol_internals_the_limits_use_are_where_they_were() -> None:
    # Fails loudly when a uvicorn upgrade (flwr pins 0.49) moves what LimitedHttpProtocol uses.
    assert uvicorn.__version__.startswith("0.49."), uvicorn.__version__
    hooks = "connection_made connection_lost data_received on_message_begin on_url on_header"
    private = "_should_upgrade _unsupported_upgrade_warning _unset_keepalive_if_required"
    for name in (*hooks.split(), *private.split(), "on_headers_complete", "on_body"):
        assert callable(getattr(HttpToolsProtocol, name)), name
    source = inspect.getsource(HttpToolsProtocol)
    for attribute in ("self.headers", "self.cycle", "self.flow", "self.parser", "self.client"):
        assert attribute in source, attribute
    cycle = inspect.signature(RequestResponseCycle.__init__).parameters
    assert {"flow", "message_event"} <= set(cycle)
    assert "self.disconnected" in inspect.getsource(RequestResponseCycle.receive)


def test_a_body_over_the_limit_is_refused_before_the_app_runs(serve, caplog) -> None:
    served = serve(FAST)
    with (
        caplog.at_level(logging.WARNING, "fedmed.flower.port_limits"),
        _connect(served.public) as sock,
    ):
        sock.sendall(_post(2 << 20))
        reply = _reply(sock)

    assert _status(reply) == 413
    assert b"public-max-body-mib" in reply and b"connection: close" in reply
    assert served.bodies == []
    assert "refused body too large from 127.0.0.1" in caplog.text


def test_a_body_at_the_limit_passes(serve) -> None:
    served = serve(FAST)
    with _connect(served.public) as sock:
        sock.sendall(_post(1 << 20) + b"\0" * (1 << 20))
        reply = _reply(sock)
    assert (_status(reply), served.bodies) == (200, [1 << 20])


def test_a_body_without_a_length_is_refused(serve) -> None:
    served = serve(FAST)
    with _connect(served.public) as sock:
        sock.sendall(
            b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        assert _status(_reply(sock)) == 411
    assert served.bodies == []


@pytest.mark.parametrize(("size", "status"), [(3000, 200), (8000, 431), (8 << 20, 431)])
def test_the_header_section_is_bounded(serve, size: int, status: int) -> None:
    served = serve(FAST)
    with _connect(served.public) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * size + b"\r\n\r\n")
        assert _status(_reply(sock)) == status


def test_headers_that_never_end_and_silent_connections_are_answered_408(serve) -> None:
    served = serve(FAST)
    with _connect(served.public) as trickling, _connect(served.public) as silent:
        trickling.sendall(b"GET /health HTTP/1.1\r\nx-a: ")
        replies = [_reply(trickling), _reply(silent)]

    assert [_status(reply) for reply in replies] == [408, 408]
    assert b"public-header-timeout" in replies[0]


def test_a_body_that_does_not_arrive_in_time_is_cut_off(serve) -> None:
    served = serve(FAST)
    with _connect(served.public) as sock:
        sock.sendall(_post(1000) + b"\0" * 10)
        reply = _reply(sock)

    assert _status(reply) == 408
    assert b"public-request-timeout" in reply
    # the app learns of the disconnect in its own task: wait for it (bounded), not a clock
    for _ in range(100):
        if served.bodies:
            break
        time.sleep(0.05)
    assert served.bodies == [None]  # the app saw the peer go, not a short body


def test_each_request_on_a_kept_alive_connection_gets_its_own_deadline(serve) -> None:
    served = serve(FAST)
    with _connect(served.public) as sock:
        sock.sendall(_post(3) + b"abc")
        first = _reply(sock)
        time.sleep(2 * FAST.request_timeout_s)  # idle (keep-alive 5 s): no deadline runs
        sock.sendall(_post(2) + b"ab")
        second = _reply(sock)
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        third = _reply(sock)

    assert [_status(first), _status(second), _status(third)] == [200, 200, 408]
    assert served.bodies == [3, 2]


def test_a_request_pipelined_behind_a_slow_answer_does_not_cut_that_answer(serve) -> None:
    served = serve(FAST)
    with _connect(served.public) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\nGET /health HTTP/1.1\r\n")
        first = _reply(sock)
        second = _reply(sock)

    assert (_status(first), _status(second)) == (200, 408)


def test_connections_are_bounded_per_peer_and_in_all(serve) -> None:
    served = serve(PortLimits(max_connections=4, max_connections_per_peer=2))
    with contextlib.ExitStack() as stack:
        peer_a = [stack.enter_context(_connect(served.public, "127.0.0.2")) for _ in range(3)]
        over_peer = _reply(peer_a[2])
        peer_b = [stack.enter_context(_connect(served.public, "127.0.0.3")) for _ in range(2)]
        over_all = _reply(stack.enter_context(_connect(served.public, "127.0.0.4")))
        # an admitted connection is served; one closed frees its place
        peer_b[0].sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        served_b = _reply(peer_b[0])
        peer_a[0].close()
        deadline = time.monotonic() + 10
        while True:
            with _connect(served.public, "127.0.0.2") as again:
                again.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                status = _status(_reply(again))
            if status != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # the server may not have seen the close yet

    assert _status(over_peer) == 503 and b"retry later" in over_peer
    assert _status(over_all) == 503
    assert _status(served_b) == 200
    assert status == 200


def test_the_private_socket_has_none_of_the_limits(serve) -> None:
    served = serve(FAST)
    with _connect(served.private) as big, _connect(served.private) as chunked:
        big.sendall(_post(2 << 20, b"x-pad: " + b"a" * 8000 + b"\r\n") + b"\0" * (2 << 20))
        chunked.sendall(
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        replies = [_reply(big), _reply(chunked)]
        with _connect(served.private) as silent:
            time.sleep(2 * FAST.header_timeout_s)
            still_open = _reply(silent, timeout=0.2) == b""

    assert [_status(reply) for reply in replies] == [200, 200]
    assert sorted(b for b in served.bodies if b is not None) == [3, 2 << 20]
    assert still_open


def test_refusals_are_logged_once_per_interval_with_the_count_skipped(caplog) -> None:
    refusals = RefusalLog(interval_s=3600)
    with caplog.at_level(logging.WARNING, "fedmed.flower.port_limits"):
        for _ in range(3):
            refusals.refused("too slow", "10.0.0.1\n", "x\x1b[31m")
        refusals.interval_s = 0.0
        refusals.refused("too slow", "10.0.0.2")

    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "public port: refused too slow from 10.0.0.1\\n: x\\x1b[31m",
        "public port: refused too slow from 10.0.0.2 (and 2 more not logged since)",
    ]


def test_escape_cuts_and_escapes() -> None:
    assert escape("a\nb\u202e") == "a\\nb\\u202e"
    assert escape("x" * 300, 10) == "x" * 10 + "..."


def test_connection_book_counts_per_peer_and_in_all() -> None:
    book = ConnectionBook(PortLimits(max_connections=2, max_connections_per_peer=1))
    assert book.admit("a") == ""
    assert "from one peer" in book.admit("a")
    assert book.admit("b") == ""
    assert "too many connections (2 open)" in book.admit("c")
    book.release("a")
    assert (book.admit("c"), book.per_peer) == ("", {"b": 1, "c": 1})


@pytest.mark.parametrize("name", ["max_body_bytes", "header_timeout_s", "max_connections"])
def test_limits_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match=rf"PortLimits.{name} = 0 must be > 0"):
        PortLimits(**{name: 0})


def test_limited_protocol_binds_its_own_limits_and_book() -> None:
    first = limited_protocol(FAST, public_port=1)
    second = limited_protocol(FAST, public_port=2)
    assert issubclass(first, LimitedHttpProtocol)
    assert (first.limits, first.public_port, second.public_port) == (FAST, 1, 2)
    assert first.book is not second.book
