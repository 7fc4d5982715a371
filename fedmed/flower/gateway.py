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
  anything else answers 404 and is logged (:class:`PublicFilter`, in
  :mod:`fedmed.flower.public_filter`, decides by the socket a request arrived on, never by
  client address).

TLS and site authentication apply on both sockets. The public socket also bounds what a peer
can make the server hold: body and header sizes, deadlines and connections
(:mod:`fedmed.flower.port_limits`, in uvicorn's protocol; the ``--max-*``/``--*-timeout`` flags,
from ``[server]`` in ``federation.toml``), and a Fleet request's signature is checked before
its body is read (:mod:`fedmed.flower.node_gate`).

The SuperLink's SQLite lock wait is raised from 5 s to 60 s
(:func:`lengthen_sqlite_busy_timeout`): on a loaded machine Flower's 500 "database is locked"
otherwise killed its own executor and stalled the run. A message is handed out only once all
its objects arrived (:func:`deliver_complete_messages`): Flower hands it out at once and the
puller then backs off a second or more per missing object. With ``$FEDMED_GATEWAY_TRACE`` set
to a file, every request is logged there as one JSON line (:class:`RequestTrace`; benchmarks).

Run as a process (``server/superlink.py`` does this)::

    python -m fedmed.server.gateway --public-host 0.0.0.0 --public-port 9092 \\
        --max-body-bytes 268435456 ... -- \\
        --host 127.0.0.1 --port 9093 --database state.db ...   # flower-superlink flags

This uses Flower internals (``flwr.superlink.cli.flower_superlink``'s argument parsing and
``SuperLinkLifespan``, ``flwr.superlink.main.create_app``, the fleet router): flwr is pinned to
1.41 and ``tests/server/test_gateway.py`` fails loudly if they move.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from fedmed.flower.node_gate import NodeGate, registered_key_lookup
from fedmed.flower.port_limits import PortLimits, limited_protocol
from fedmed.flower.public_filter import PUBLIC_ROUTES, PublicFilter, fleet_routes

__all__ = [
    "PUBLIC_ROUTES",
    "TRACE_ENV",
    "PublicFilter",
    "RequestTrace",
    "deliver_complete_messages",
    "fleet_routes",
    "incomplete_objects",
    "lengthen_sqlite_busy_timeout",
    "main",
    "open_socket",
    "port_limits",
]

log = logging.getLogger("fedmed.server.gateway")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TRACE_ENV = "FEDMED_GATEWAY_TRACE"  # a file: one JSON line per request (benchmarks)
HOLD_INCOMPLETE_S = 30.0  # longest a message with objects still uploading is held back
# Flower waits 5 s for SQLite's write lock, then answers 500 ("database is locked"); its own
# executor dies on such an answer and the run stalls. Seen on a loaded 2-core machine.
SQLITE_BUSY_TIMEOUT_MS = "60000"


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


def lengthen_sqlite_busy_timeout(milliseconds: str = SQLITE_BUSY_TIMEOUT_MS) -> None:
    """Make the SuperLink's SQLite connections wait ``milliseconds`` for a lock (Flower: 5 s)."""
    sql_mixin = importlib.import_module("flwr.supercore.sql_mixin")
    pragmas = tuple(sql_mixin.SQLITE_PRAGMAS)
    if "busy_timeout" not in dict(pragmas):
        raise RuntimeError("flwr's SQLite pragmas have no busy_timeout: the flwr internals moved")
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, milliseconds if name == "busy_timeout" else value) for name, value in pragmas
    )


def incomplete_objects(store: Any, object_id: str) -> bool:
    """Whether the object tree of ``object_id`` (a message) in Flower's SQL object store still
    misses content or is not registered yet: Flower stores a pushed message, then registers
    its tree, then receives the objects, in separate transactions. One recursive query."""
    from sqlalchemy import func, literal, select

    models = importlib.import_module("flwr.supercore.state.schema.objectstore_models")
    stored, child = models.StoredObject, models.ObjectChild
    tree = select(literal(object_id).label("id")).cte("tree", recursive=True)
    tree = tree.union(select(child.child_id).join(tree, child.parent_id == tree.c.id))
    size = select(func.count()).select_from(tree).scalar_subquery()
    available = (
        select(func.count())
        .select_from(stored)
        .join(tree, stored.object_id == tree.c.id)
        .where(stored.is_available == 1)
        .scalar_subquery()
    )
    with store.session() as session:
        total, present = session.execute(select(size, available)).one()
    return present < total


def deliver_complete_messages(hold_s: float = HOLD_INCOMPLETE_S) -> None:
    """Make the SuperLink hand out a message only once all its objects arrived.

    Flower stores a pushed message first and its objects (the arrays) after, and delivers the
    message at once: a site (Fleet ``pull-messages``) or the server app (Runtime
    ``pull-messages``) that sees it before the upload ended gets "object unavailable" and backs
    off 1 s, 2 s, 4 s ... (``flwr.supercore.constant.PULL_INITIAL_BACKOFF``), one message at a
    time; seen as 1-5 s per round here. With this patch a message whose objects are
    incomplete stays undelivered (polled again next time) for at most ``hold_s`` s since the
    gateway first saw it so (then Flower's behaviour: deliver it anyway).
    """
    from sqlalchemy import select

    sql_linkstate = importlib.import_module("flwr.server.superlink.linkstate.sql_linkstate")
    models = importlib.import_module("flwr.supercore.state.schema.linkstate_models")
    to_sint64 = importlib.import_module("flwr.supercore.utils").uint64_to_int64
    cls = sql_linkstate.SqlLinkState
    already = getattr(cls, "_fedmed_hold_s", None) is not None
    cls._fedmed_hold_s = hold_s
    if already:
        return
    original_ins, original_res = cls.get_message_ins, cls.get_message_res
    first_seen: dict[str, float] = {}
    released: set[str] = set()  # delivered incomplete after the hold (warned once)

    def held(state: Any, message_ids: Sequence[str]) -> set[str]:
        now = time.monotonic()
        out = set()
        for mid in message_ids:
            if incomplete_objects(state.object_store, mid):
                if now - first_seen.setdefault(mid, now) < cls._fedmed_hold_s:
                    out.add(mid)
                elif mid not in released:
                    released.add(mid)
                    log.warning(
                        "message %s: objects still missing after %.0f s; delivered anyway "
                        "(the puller waits for them as Flower does)",
                        mid[:12],
                        cls._fedmed_hold_s,
                    )
            else:
                first_seen.pop(mid, None)
        if len(first_seen) > 10_000:  # forget what was delivered or deleted long ago
            first_seen.clear()
            released.clear()
        return out

    def get_message_ins(
        self: Any, node_id: int, limit: int | None, *, run_id: int | None = None
    ) -> list[Any]:
        ins = models.MessageIns
        stmt = select(ins.message_id).where(
            ins.dst_node_id == to_sint64(node_id),
            ins.delivered_at == "",
            ins.created_at + ins.ttl > time.time(),
        )
        if run_id is not None:
            stmt = stmt.where(ins.run_id == to_sint64(run_id))
        stmt = stmt.order_by(ins.created_at.asc(), ins.message_id.asc())
        with self.session() as session:
            pending = session.scalars(stmt.limit(limit) if limit else stmt).all()
        if pending and held(self, pending):
            return []  # the site polls again shortly
        return original_ins(self, node_id, limit, run_id=run_id)

    def get_message_res(self: Any, message_ids: set[str], run_id: int) -> list[Any]:
        res = models.MessageRes
        ids = set(message_ids)
        if ids:
            with self.session() as session:
                rows = session.execute(
                    select(res.message_id, res.reply_to_message_id).where(
                        res.reply_to_message_id.in_(ids), res.delivered_at == ""
                    )
                ).all()
            reply_to = dict(rows)
            ids -= {reply_to[mid] for mid in held(self, list(reply_to))}
        return original_res(self, ids, run_id)

    cls.get_message_ins = get_message_ins
    cls.get_message_res = get_message_res


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m fedmed.server.gateway",
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
    import uvicorn

    lengthen_sqlite_busy_timeout()
    deliver_complete_messages()
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
    app = PublicFilter(gated, public_port=args.public_port)
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
