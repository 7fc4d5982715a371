"""The SuperLink with its control port closed: one process, a private and a public socket.

Flower 1.41's SuperLink is one FastAPI app serving the Fleet API (sites), the Control API (run
submission, site key registration, no authentication in the open-source build) and the Runtime
API (the server app and executor, no authentication either) on one port: anyone who reaches it
could push code to every site. This module builds the same app the way ``flower-superlink``
does and serves it from one uvicorn server on two sockets:

* the **private** socket (always 127.0.0.1): everything; ``fedmed-server`` submits runs and
  registers keys here and Flower's own executor and server app use its Runtime API;
* the **public** socket (``[server] host:port``): only the exact Fleet API routes
  (:data:`PUBLIC_ROUTES`, taken from ``flwr.superlink.routers.fleet.router``) and ``/health``;
  anything else answers 404 and is logged.

The decision is made by the socket a request arrived on (``scope["server"]``), never by client
address, so a proxy or a forwarded header cannot widen it. TLS and site authentication apply on
both sockets. The SuperLink's SQLite lock wait is raised from 5 s to 60 s
(:func:`lengthen_sqlite_busy_timeout`): on a loaded machine Flower's 500 "database is locked"
otherwise killed its own executor and stalled the run.

Run as a process (``server/superlink.py`` does this)::

    python -m fedmed.server.gateway --public-host 0.0.0.0 --public-port 9092 -- \\
        --host 127.0.0.1 --port 9093 --database state.db ...   # flower-superlink flags

This uses Flower internals (``flwr.superlink.cli.flower_superlink``'s argument parsing and
``SuperLinkLifespan``, ``flwr.superlink.main.create_app``, the fleet router): flwr is pinned to
1.41 and ``tests/server/test_gateway.py`` fails loudly if they move.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

__all__ = [
    "PUBLIC_ROUTES",
    "PublicFilter",
    "fleet_routes",
    "lengthen_sqlite_busy_timeout",
    "main",
    "open_socket",
]

log = logging.getLogger("fedmed.server.gateway")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEALTH_ROUTE = ("GET", "/health")
# Flower waits 5 s for SQLite's write lock, then answers 500 ("database is locked"); its own
# executor dies on such an answer and the run stalls. Seen on a loaded 2-core machine.
SQLITE_BUSY_TIMEOUT_MS = "60000"


def fleet_routes() -> frozenset[tuple[str, str]]:
    """(method, path) of every route of Flower's Fleet API router (what sites call)."""
    from flwr.superlink.routers.fleet.router import router

    routes = set()
    for route in router.routes:
        for method in getattr(route, "methods", None) or ():
            routes.add((method, route.path))
    if not routes:
        raise RuntimeError("flwr's fleet router has no routes: the flwr internals moved")
    return frozenset(routes)


PUBLIC_ROUTES: frozenset[tuple[str, str]] = fleet_routes() | {HEALTH_ROUTE}


class PublicFilter:
    """ASGI middleware: requests on the public port reach only :data:`PUBLIC_ROUTES`.

    Example:
        >>> app = PublicFilter(fastapi_app, public_port=9092)   # private socket: anything
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        public_port: int,
        allowed: frozenset[tuple[str, str]] = PUBLIC_ROUTES,
    ) -> None:
        self.app = app
        self.public_port = public_port
        self.allowed = allowed

    def is_public(self, scope: Scope) -> bool:
        """Whether the request arrived on the public socket (unknown socket counts as public)."""
        server = scope.get("server")
        return not server or server[1] == self.public_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan" or not self.is_public(scope):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "")
        path = scope.get("path", "")
        # Exact match on the decoded path Starlette routes on: no prefix, no normalisation, so
        # `..`, `%2e%2e`, `//` or a trailing slash can never reach another router.
        if kind == "http" and (method, path) in self.allowed and not scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?", 0)
        log.warning("public port: refused %s %s %r from %s", kind, method, path, client[0])
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b'{"detail":"Not Found"}'
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


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


def lengthen_sqlite_busy_timeout(milliseconds: str = SQLITE_BUSY_TIMEOUT_MS) -> None:
    """Make the SuperLink's SQLite connections wait ``milliseconds`` for a lock (Flower: 5 s)."""
    sql_mixin = importlib.import_module("flwr.supercore.sql_mixin")
    pragmas = tuple(sql_mixin.SQLITE_PRAGMAS)
    if "busy_timeout" not in dict(pragmas):
        raise RuntimeError("flwr's SQLite pragmas have no busy_timeout: the flwr internals moved")
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, milliseconds if name == "busy_timeout" else value) for name, value in pragmas
    )


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m fedmed.server.gateway",
        description="Flower SuperLink with only the Fleet API on the public socket",
    )
    parser.add_argument("--public-host", required=True)
    parser.add_argument("--public-port", type=int, required=True)
    args, rest = parser.parse_known_args(list(argv))
    if rest and rest[0] == "--":
        rest = rest[1:]
    return args, rest


def main(argv: Sequence[str] | None = None) -> None:
    """Parse gateway flags, hand the rest to Flower's SuperLink parser, serve both sockets."""
    args, superlink_args = _parse(sys.argv[1:] if argv is None else argv)
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
    app = PublicFilter(create_app(config, cli.SuperLinkLifespan), public_port=args.public_port)
    uvi_config = uvicorn.Config(
        app,
        reload=False,
        access_log=True,
        log_config=get_uvicorn_log_config(console_handler.level),
        ssl_keyfile=config.ssl_keyfile,
        ssl_certfile=config.ssl_certfile,
        workers=1,
    )
    print(
        f"fedmed gateway: private (everything) {config.host}:{config.port}; public (Fleet API "
        f"and /health only) {args.public_host}:{args.public_port}; "
        f"TLS {'on' if config.ssl_certfile else 'OFF'}",
        flush=True,
    )
    uvicorn.Server(uvi_config).run(sockets=[private, public])


if __name__ == "__main__":
    main()
