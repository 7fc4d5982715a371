"""The public socket serves only Flower's Fleet API and ``/health``: everything else is 404.

Flower 1.41's SuperLink serves the Fleet API (sites), the Control API (run submission, key
registration; no authentication in the open-source build) and the Runtime API (no
authentication either) from one app. :class:`PublicFilter` lets requests that arrived on the
public socket reach only the exact routes of Flower's fleet router
(``flwr.superlink.routers.fleet.router``) and ``/health`` (:data:`PUBLIC_ROUTES`); anything
else answers 404 and is logged (rate-limited, :class:`~fedmed.flower.port_limits.RefusalLog`).
The decision is made by the socket a request arrived on (``scope["server"]``), never by client
address, so a proxy or a forwarded header cannot widen it. Before the gateway serves anything,
:func:`verify_public_routes` proves that the allowed routes are Fleet API routes and none of
Flower's Control API ones (a Flower upgrade that moved them refuses to start, never exposes).

Example:
    >>> app = PublicFilter(flower_app, public_port=9092)   # private socket: anything
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fedmed.errors import SecurityError
from fedmed.flower.port_limits import refusal_log
from fedmed.flower.version import installed_flower_version

__all__ = [
    "FLEET_PREFIX",
    "HEALTH_ROUTE",
    "PUBLIC_ROUTES",
    "PublicFilter",
    "control_routes",
    "fleet_routes",
    "verify_public_routes",
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEALTH_ROUTE = ("GET", "/health")
FLEET_PREFIX = "/v1/fleet/"


def _routes(router: Any) -> frozenset[tuple[str, str]]:
    return frozenset(
        (method, route.path)
        for route in router.routes
        for method in getattr(route, "methods", None) or ()
    )


def fleet_routes() -> frozenset[tuple[str, str]]:
    """(method, path) of every route of Flower's Fleet API router (what sites call)."""
    from flwr.superlink.routers.fleet.router import router

    routes = _routes(router)
    if not routes:
        raise RuntimeError("flwr's fleet router has no routes: the flwr internals moved")
    return routes


def control_routes() -> frozenset[tuple[str, str]]:
    """(method, path) of every route of Flower's Control API router (run submission, keys).

    Raises:
        SecurityError: the router is not where fedmed expects it (then nothing is proven).
    """
    try:
        from flwr.superlink.routers.control.router import router
    except ImportError as err:
        raise SecurityError(
            f"flwr {installed_flower_version()} has no Control API router where fedmed looks "
            f"for it ({err}): cannot prove that the public port hides the Control API"
        ) from err
    return _routes(router)


def verify_public_routes(allowed: frozenset[tuple[str, str]]) -> None:
    """Prove that ``allowed`` exposes the Fleet API (and ``/health``) and nothing else.

    Raises:
        SecurityError: ``allowed`` is empty of Fleet API routes, holds a path outside
            ``/v1/fleet/`` other than ``/health``, or holds a Control API route; the message
            names the routes and the installed flwr version.
    """
    version = installed_flower_version()
    outside = sorted(
        f"{method} {path}"
        for method, path in allowed
        if (method, path) != HEALTH_ROUTE and not path.startswith(FLEET_PREFIX)
    )
    control = sorted(f"{method} {path}" for method, path in allowed & control_routes())
    if control or outside:
        raise SecurityError(
            f"the public port would serve {', '.join(control + outside)}, which "
            f"{'are Control API routes' if control else f'lie outside {FLEET_PREFIX}'} under "
            f"flwr {version}: its routers changed, and the Control API (run submission, key "
            "registration) must never be public; use a supported flwr version"
        )
    if not any(path.startswith(FLEET_PREFIX) for _, path in allowed):
        raise SecurityError(
            f"flwr {version}'s Fleet API router has no {FLEET_PREFIX} route: its routers "
            "changed; use a supported flwr version"
        )


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
