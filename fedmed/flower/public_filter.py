"""The public socket serves only Flower's Fleet API and ``/health``: everything else is 404.

Flower 1.41's SuperLink serves the Fleet API (sites), the Control API (run submission, key
registration; no authentication in the open-source build) and the Runtime API (no
authentication either) from one app. :class:`PublicFilter` lets requests that arrived on the
public socket reach only the exact routes of Flower's fleet router
(``flwr.superlink.routers.fleet.router``) and ``/health`` (:data:`PUBLIC_ROUTES`); anything
else answers 404 and is logged (rate-limited, :class:`~fedmed.flower.port_limits.RefusalLog`).
The decision is made by the socket a request arrived on (``scope["server"]``), never by client
address, so a proxy or a forwarded header cannot widen it.

Example:
    >>> app = PublicFilter(flower_app, public_port=9092)   # private socket: anything
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fedmed.flower.port_limits import refusal_log

__all__ = ["HEALTH_ROUTE", "PUBLIC_ROUTES", "PublicFilter", "fleet_routes"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEALTH_ROUTE = ("GET", "/health")


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
        refusal_log.refused("path outside the Fleet API", client[0], f"{kind} {method} {path}")
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
