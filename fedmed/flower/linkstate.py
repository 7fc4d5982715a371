"""Two SuperLink speed-ups inside Flower's SQL state: a longer SQLite lock wait, and a message
handed out only once all its objects arrived.

* :func:`lengthen_sqlite_busy_timeout`: Flower waits 5 s for SQLite's write lock, then answers
  500 ("database is locked"); its own executor dies on such an answer and the run stalls (seen
  on a loaded 2-core machine). The SuperLink's connections wait 60 s instead.
* :func:`deliver_complete_messages`: Flower stores a pushed message first and its objects (the
  arrays) after, and delivers the message at once; the puller then backs off a second or more
  per object not there yet. The patched ``SqlLinkState`` holds such a message back (for at most
  :data:`HOLD_INCOMPLETE_S` s) until :func:`incomplete_objects` says its tree is complete.

Both replace Flower internals (``flwr.supercore.sql_mixin.SQLITE_PRAGMAS``, ``SqlLinkState``'s
``get_message_ins``/``get_message_res``, the object store's ORM models);
``tests/flower/test_linkstate.py`` and ``tests/flower/test_flower_contract.py`` fail if they move.
:mod:`fedmed.flower.gateway` applies both before it builds the SuperLink.

Example:
    >>> lengthen_sqlite_busy_timeout()
    >>> deliver_complete_messages()          # then build Flower's SuperLink app
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Sequence
from typing import Any

__all__ = [
    "HOLD_INCOMPLETE_S",
    "SQLITE_BUSY_TIMEOUT_MS",
    "deliver_complete_messages",
    "incomplete_objects",
    "lengthen_sqlite_busy_timeout",
]

log = logging.getLogger(__name__)

HOLD_INCOMPLETE_S = 30.0  # longest a message with objects still uploading is held back
# Flower waits 5 s for SQLite's write lock, then answers 500 ("database is locked"); its own
# executor dies on such an answer and the run stalls. Seen on a loaded 2-core machine.
SQLITE_BUSY_TIMEOUT_MS = "60000"


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
