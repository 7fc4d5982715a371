"""A stand-in SuperLink that speaks Flower's Fleet API (protobuf over HTTP) and can break.

Flower's real SuperLink cannot be made to answer HTTP 500 on demand; this one answers each
``/v1/fleet/*`` route either with the route's empty-but-valid protobuf response or, for the
routes in ``FakeSuperLink.fail``, with HTTP 500, and records every request it got.

Example::

    with serve_fake_superlink() as fake:
        fake.fail.add("pull-messages")
        ...  # start a SuperNode with --superlink fake.address --insecure
        fake.got("activate-node")[0].heartbeat_interval
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeSuperLink", "serve_fake_superlink"]

NODE_ID = 4242


@dataclass
class FakeSuperLink:
    """What the fake answers (``fail``: routes that get HTTP 500) and what it was asked."""

    address: str = ""
    fail: set[str] = field(default_factory=set)
    requests: list[tuple[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def got(self, route: str) -> list[Any]:
        """Parsed requests received on ``route`` (e.g. ``"activate-node"``)."""
        with self.lock:
            return [request for name, request in self.requests if name == route]


def _routes() -> dict[str, tuple[type, Any]]:
    from flwr.proto.fleet_pb2 import (
        ActivateNodeRequest,
        ActivateNodeResponse,
        DeactivateNodeRequest,
        DeactivateNodeResponse,
        PullMessagesRequest,
        PullMessagesResponse,
        RegisterNodeFleetRequest,
        RegisterNodeFleetResponse,
        UnregisterNodeFleetRequest,
        UnregisterNodeFleetResponse,
    )
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest, SendNodeHeartbeatResponse

    return {
        "register-node": (RegisterNodeFleetRequest, RegisterNodeFleetResponse()),
        "activate-node": (ActivateNodeRequest, ActivateNodeResponse(node_id=NODE_ID)),
        "send-node-heartbeat": (SendNodeHeartbeatRequest, SendNodeHeartbeatResponse(success=True)),
        "pull-messages": (PullMessagesRequest, PullMessagesResponse()),
        "deactivate-node": (DeactivateNodeRequest, DeactivateNodeResponse()),
        "unregister-node": (UnregisterNodeFleetRequest, UnregisterNodeFleetResponse()),
    }


@contextlib.contextmanager
def serve_fake_superlink() -> Iterator[FakeSuperLink]:
    """A fake SuperLink on a free 127.0.0.1 port, insecure (plain HTTP), while in the block."""
    routes = _routes()
    fake = FakeSuperLink()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            name = self.path.removeprefix("/v1/fleet/")
            if name not in routes:
                self.send_error(404)
                return
            request_type, response = routes[name]
            request = request_type()
            request.ParseFromString(body)
            with fake.lock:
                fake.requests.append((name, request))
            if name in fake.fail:
                self.send_error(500, "Internal Server Error")
                return
            payload = response.SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/protobuf")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    fake.address = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="fake-superlink")
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
