"""The SuperLink with its control port closed: one process, a private and a public socket.

Flower 1.41's SuperLink is one FastAPI app serving the Fleet API (sites), the Control API (run
submission, site key registration, no authentication in the open-source build) and the Runtime
API (the server app and executor, no authentication either) on one port: anyone who reaches it
could push code to every site. This module builds the same app the way ``flower-superlink``
does and serves it from one uvicorn server on two sockets:

* the **private** socket (always 127.0.0.1): everything; ``fedmed-server`` submits runs and
  registers keys here and Flower's own executor and server app use its Runtime API;
* the **public** socket (``[server] host:port``): only the exact Fleet API routes
  (:data:`~fedmed.flower.public_filter.PUBLIC_ROUTES`, taken from
  ``flwr.superlink.routers.fleet.router``) and ``/health``; anything else answers 404 and is
  logged (:class:`~fedmed.flower.public_filter.PublicFilter` decides by the socket a request
  arrived on, never by client address).

It fails closed: before it listens it checks the installed flwr version
(:func:`fedmed.flower.version.check_flower_version`) and that the public routes are Fleet API
routes and none of Flower's Control API
(:func:`~fedmed.flower.public_filter.verify_public_routes`); otherwise it exits with the
reason and never opens the public socket.

TLS and site authentication apply on both sockets. The public socket also bounds what a peer
can make the server hold: body and header sizes, deadlines and connections
(:mod:`fedmed.flower.port_limits`, in uvicorn's protocol; the ``--max-*``/``--*-timeout`` flags,
from ``[server]`` in ``federation.toml``), and a Fleet request's signature is checked before
its body is read (:mod:`fedmed.flower.node_gate`). The SuperLink's SQL state gets a longer
SQLite lock wait (:mod:`fedmed.flower.linkstate`). With ``$FEDMED_GATEWAY_TRACE`` set to a
file, every request is logged there as one JSON line (:class:`RequestTrace`; benchmarks).

Run as a process (``server/superlink.py`` does this)::

    python -m fedmed.flower.gateway --public-host 0.0.0.0 --public-port 9092 \\
        --max-body-bytes 268435456 ... -- \\
        --host 127.0.0.1 --port 9093 --database state.db ...   # flower-superlink flags

This uses Flower internals (``flwr.superlink.cli.flower_superlink``'s argument parsing and
``SuperLinkLifespan``, ``flwr.superlink.main.create_app``, the fleet router);
``tests/flower/test_flower_contract.py`` fails loudly if they move.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from fedmed.errors import FedmedError
from fedmed.flower.linkstate import lengthen_sqlite_busy_timeout
from fedmed.flower.node_gate import NodeGate, registered_key_lookup
from fedmed.flower.port_limits import PortLimits, limited_protocol
from fedmed.flower.public_filter import PUBLIC_ROUTES, PublicFilter, verify_public_routes
from fedmed.flower.version import check_flower_version

__all__ = ["TRACE_ENV", "RequestTrace", "main", "open_socket", "port_limits"]


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TRACE_ENV = "FEDMED_GATEWAY_TRACE"  # a file: one JSON line per request (benchmarks)


class RequestTrace:
    """ASGI middleware writing one JSON line per HTTP request to ``path`` (for benchmarks):
    wall-clock start ``t``, duration ``s``, ``port`` it arrived on, ``path``, ``status``,
    request and response body bytes ``in``/``out``.

    Example:
        >>> app = RequestTrace(fastapi_app, Path("trace.jsonl"))
    """

    def __init__(self, app: ASGIApp, path: Path) -> None:
        self.app = app
        self.file = path.open("a", buffering=1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, clock = time.time(), time.perf_counter()
        sizes = {"in": 0, "out": 0, "status": 0}

        async def counted_receive() -> MutableMapping[str, Any]:
            message = await receive()
            sizes["in"] += len(message.get("body", b""))
            return message

        async def counted_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sizes["status"] = message["status"]
            sizes["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            server = scope.get("server") or ("", 0)
            record = {
                "t": round(start, 4),
                "s": round(time.perf_counter() - clock, 4),
                "port": server[1],
                "path": scope.get("path", ""),
                **sizes,
            }
            self.file.write(json.dumps(record) + "\n")


def open_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for ``host:port`` (uvicorn listens on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise SystemExit(f"fedmed gateway: cannot listen on {host}:{port}: {err}") from err
    sock.set_inheritable(True)
    return sock


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m fedmed.flower.gateway",
        description="Flower SuperLink with only the Fleet API on the public socket",
    )
    parser.add_argument("--public-host", required=True)
    parser.add_argument("--public-port", type=int, required=True)
    limits = PortLimits()
    for flag, kind, default in (
        ("--max-body-bytes", int, limits.max_body_bytes),
        ("--max-header-bytes", int, limits.max_header_bytes),
        ("--header-timeout", float, limits.header_timeout_s),
        ("--request-timeout", float, limits.request_timeout_s),
        ("--max-connections", int, limits.max_connections),
        ("--max-connections-per-peer", int, limits.max_connections_per_peer),
        ("--keep-alive-timeout", float, 5.0),
    ):
        parser.add_argument(flag, type=kind, default=default, help=f"default {default}")
    args, rest = parser.parse_known_args(list(argv))
    if rest and rest[0] == "--":
        rest = rest[1:]
    return args, rest


def port_limits(args: argparse.Namespace) -> PortLimits:
    """The public port's limits from the parsed gateway flags.

    Raises:
        SystemExit: a limit is not positive.
    """
    try:
        return PortLimits(
            max_body_bytes=args.max_body_bytes,
            max_header_bytes=args.max_header_bytes,
            header_timeout_s=args.header_timeout,
            request_timeout_s=args.request_timeout,
            max_connections=args.max_connections,
            max_connections_per_peer=args.max_connections_per_peer,
        )
    except ValueError as err:
        raise SystemExit(f"fedmed gateway: {err}") from err


def main(argv: Sequence[str] | None = None) -> None:
    """Parse gateway flags, hand the rest to Flower's SuperLink parser, serve both sockets."""
    args, superlink_args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        # Fail closed: never open the public socket unless it provably hides the Control API.
        check_flower_version()
        verify_public_routes(PUBLIC_ROUTES)
    except FedmedError as err:
        raise SystemExit(f"fedmed gateway: refusing to start: {err}") from err
    import uvicorn

    lengthen_sqlite_busy_timeout()
    cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    # Flower's parser reads sys.argv: give it exactly the flower-superlink flags.
    sys.argv = ["flower-superlink", *superlink_args]
    config = cli._parse_superlink_lifespan_config()
    if config.host not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit(
            f"fedmed gateway: --host {config.host} must be loopback: it is the private socket"
        )
    if config.port == args.public_port:
        raise SystemExit("fedmed gateway: the public and private ports must differ")
    private = open_socket(config.host, config.port)
    public = open_socket(args.public_host, args.public_port)
    limits = port_limits(args)
    flower_app = create_app(config, cli.SuperLinkLifespan)
    inner: ASGIApp = flower_app
    if trace := os.environ.get(TRACE_ENV):
        inner = RequestTrace(inner, Path(trace))
    known_key = registered_key_lookup(flower_app) if config.enable_supernode_auth else None
    gated = NodeGate(
        inner,
        public_port=args.public_port,
        max_body_bytes=limits.max_body_bytes,
        known_key=known_key,
    )
    app = PublicFilter(gated, public_port=args.public_port, allowed=PUBLIC_ROUTES)
    uvi_config = uvicorn.Config(
        app,
        reload=False,
        access_log=True,
        log_config=get_uvicorn_log_config(console_handler.level),
        ssl_keyfile=config.ssl_keyfile,
        ssl_certfile=config.ssl_certfile,
        workers=1,
        http=limited_protocol(limits, public_port=args.public_port),
        ws="none",  # Flower serves no WebSocket route
        timeout_keep_alive=args.keep_alive_timeout,
    )
    print(
        f"fedmed gateway: private (everything) {config.host}:{config.port}; public (Fleet API "
        f"and /health only) {args.public_host}:{args.public_port}; "
        f"TLS {'on' if config.ssl_certfile else 'OFF'}; public limits {limits}; site "
        f"signatures checked before the body: {'yes' if known_key else 'no'}",
        flush=True,
    )
    uvicorn.Server(uvi_config).run(sockets=[private, public])


if __name__ == "__main__":
    main()
