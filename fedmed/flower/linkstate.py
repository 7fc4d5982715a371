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
:mod:`fedmed.flower.gateway` applies both before it builds the SuperLink. Both are speed-ups
(:mod:`fedmed.flower.speedups`: ``sqlite-timeout``, ``handout``): each checks first that Flower
still has what it replaces and otherwise changes nothing (one warning, Flower's behaviour); the
hand-out also gives every call back to Flower, for good, the first time its own query fails.

Example:
    >>> lengthen_sqlite_busy_timeout()
    >>> deliver_complete_messages()          # then build Flower's SuperLink app
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
from collections.abc import Sequence
from typing import Any

from fedmed.flower.speedups import drifted, enabled, import_for, source_of

__all__ = [
    "HOLD_INCOMPLETE_S",
    "SQLITE_BUSY_TIMEOUT_MS",
    "deliver_complete_messages",
    "handout_mismatch",
    "incomplete_objects",
    "lengthen_sqlite_busy_timeout",
]

log = logging.getLogger(__name__)

HOLD_INCOMPLETE_S = 30.0  # longest a message with objects still uploading is held back
# Flower waits 5 s for SQLite's write lock, then answers 500 ("database is locked"); its own
# executor dies on such an answer and the run stalls. Seen on a loaded 2-core machine.
SQLITE_BUSY_TIMEOUT_MS = "60000"
SQL_MIXIN = "flwr.supercore.sql_mixin"
LINKSTATE_MODULE = "flwr.server.superlink.linkstate.sql_linkstate"
LINKSTATE_MODELS = "flwr.supercore.state.schema.linkstate_models"
OBJECT_MODELS = "flwr.supercore.state.schema.objectstore_models"
# What the hand-out wraps and queries: SqlLinkState's delivery methods (parameters) ...
_DELIVERY = {
    "get_message_ins": ["self", "node_id", "limit", "run_id"],
    "get_message_res": ["self", "message_ids", "run_id"],
}
# ... and the columns of Flower's ORM models.
_COLUMNS = {
    (LINKSTATE_MODELS, "MessageIns"): {"message_id", "dst_node_id", "delivered_at", "created_at",
                                       "ttl", "run_id"},
    (LINKSTATE_MODELS, "MessageRes"): {"message_id", "reply_to_message_id", "delivered_at"},
    (OBJECT_MODELS, "StoredObject"): {"object_id", "is_available"},
    (OBJECT_MODELS, "ObjectChild"): {"parent_id", "child_id"},
}  # fmt: skip


def lengthen_sqlite_busy_timeout(milliseconds: str = SQLITE_BUSY_TIMEOUT_MS) -> bool:
    """Make the SuperLink's SQLite connections wait ``milliseconds`` for a lock (Flower: 5 s).

    Returns False, changing nothing (stock), when the speed-up ``sqlite-timeout`` is switched
    off or Flower no longer sets its pragmas from ``SQLITE_PRAGMAS`` (one warning).
    """
    if not enabled("sqlite-timeout"):
        return False
    sql_mixin = import_for("sqlite-timeout", SQL_MIXIN)
    if sql_mixin is None:
        return False
    try:
        pragmas = tuple((str(k), str(v)) for k, v in getattr(sql_mixin, "SQLITE_PRAGMAS", ()))
    except (TypeError, ValueError):
        pragmas = ()
    if "busy_timeout" not in dict(pragmas):
        drifted("sqlite-timeout", f"{SQL_MIXIN}.SQLITE_PRAGMAS has no busy_timeout pair")
        return False
    if "SQLITE_PRAGMAS" not in source_of(getattr(sql_mixin, "_set_sqlite_pragmas", None)):
        drifted("sqlite-timeout", f"{SQL_MIXIN}._set_sqlite_pragmas no longer reads them")
        return False
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, milliseconds if name == "busy_timeout" else value) for name, value in pragmas
    )
    return True


def incomplete_objects(store: Any, object_id: str) -> bool:
    """Whether the object tree of ``object_id`` (a message) in Flower's SQL object store still
    misses content or is not registered yet: Flower stores a pushed message, then registers
    its tree, then receives the objects, in separate transactions. One recursive query."""
    from sqlalchemy import func, literal, select

    models = importlib.import_module(OBJECT_MODELS)
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


def handout_mismatch() -> str:
    """What the installed Flower lacks of what :func:`deliver_complete_messages` wraps and
    queries ('' when it has everything)."""
    try:
        importlib.import_module("sqlalchemy")
        cls = importlib.import_module(LINKSTATE_MODULE).SqlLinkState
        if not callable(importlib.import_module("flwr.supercore.utils").uint64_to_int64):
            return "flwr.supercore.utils.uint64_to_int64 is not callable"
    except (ImportError, AttributeError) as err:
        return f"cannot import what the hand-out uses ({err})"
    for name, expected in _DELIVERY.items():
        method = getattr(cls, name, None)
        try:
            parameters = inspect.signature(method).parameters  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return f"{LINKSTATE_MODULE}.SqlLinkState.{name} is gone"
        if list(parameters) != expected:
            return f"SqlLinkState.{name} takes {list(parameters)}, not {expected}"
    for name in ("session", "object_store"):
        if not hasattr(cls, name):
            return f"SqlLinkState has no {name}"
    for (module, model), columns in _COLUMNS.items():
        try:
            found = set(getattr(importlib.import_module(module), model).__table__.columns.keys())
        except (ImportError, AttributeError) as err:
            return f"{module}.{model} is gone ({err})"
        if missing := sorted(columns - found):
            return f"{module}.{model} has no column {missing}"
    return ""


def deliver_complete_messages(hold_s: float = HOLD_INCOMPLETE_S) -> bool:
    """Make the SuperLink hand out a message only once all its objects arrived.

    Flower stores a pushed message first and its objects (the arrays) after, and delivers the
    message at once: a site (Fleet ``pull-messages``) or the server app (Runtime
    ``pull-messages``) that sees it before the upload ended gets "object unavailable" and backs
    off 1 s, 2 s, 4 s ... (``flwr.supercore.constant.PULL_INITIAL_BACKOFF``), one message at a
    time; seen as 1-5 s per round here. With this patch a message whose objects are
    incomplete stays undelivered (polled again next time) for at most ``hold_s`` s since the
    gateway first saw it so (then Flower's behaviour: deliver it anyway).

    Returns False, changing nothing (stock), when the speed-up ``handout`` is switched off or
    :func:`handout_mismatch` finds Flower changed (one warning). Once applied, the first
    failure of its own query (not a lock wait) restores Flower's methods and warns: the
    message at hand and all later ones are delivered as Flower does.
    """
    if not enabled("handout"):
        return False
    if missing := handout_mismatch():
        drifted("handout", missing)
        return False
    from sqlalchemy import select
    from sqlalchemy.exc import OperationalError

    models = importlib.import_module(LINKSTATE_MODELS)
    to_sint64 = importlib.import_module("flwr.supercore.utils").uint64_to_int64
    cls = importlib.import_module(LINKSTATE_MODULE).SqlLinkState
    already = getattr(cls, "_fedmed_hold_s", None) is not None
    cls._fedmed_hold_s = hold_s
    if already:
        return True
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

    def give_back(err: Exception) -> None:
        """Flower's own methods from now on; a lock wait is no drift: stock for this call."""
        if isinstance(err, OperationalError) and "locked" in str(err):
            log.info("message hand-out: database locked; this call delivers as Flower does")
            return
        cls.get_message_ins, cls.get_message_res = original_ins, original_res
        cls._fedmed_hold_s = None
        drifted("handout", f"its query over Flower's tables failed: {type(err).__name__}: {err}")

    def held_ins(state: Any, node_id: int, limit: int | None, run_id: int | None) -> bool:
        ins = models.MessageIns
        stmt = select(ins.message_id).where(
            ins.dst_node_id == to_sint64(node_id),
            ins.delivered_at == "",
            ins.created_at + ins.ttl > time.time(),
        )
        if run_id is not None:
            stmt = stmt.where(ins.run_id == to_sint64(run_id))
        stmt = stmt.order_by(ins.created_at.asc(), ins.message_id.asc())
        with state.session() as session:
            pending = session.scalars(stmt.limit(limit) if limit else stmt).all()
        return bool(pending and held(state, pending))

    def held_res(state: Any, ids: set[str]) -> set[str]:
        res = models.MessageRes
        with state.session() as session:
            rows = session.execute(
                select(res.message_id, res.reply_to_message_id).where(
                    res.reply_to_message_id.in_(ids), res.delivered_at == ""
                )
            ).all()
        reply_to = dict(rows)
        return {reply_to[mid] for mid in held(state, list(reply_to))}

    def get_message_ins(
        self: Any, node_id: int, limit: int | None, *, run_id: int | None = None
    ) -> list[Any]:
        try:
            if held_ins(self, node_id, limit, run_id):
                return []  # the site polls again shortly
        except Exception as err:  # never break delivery: Flower's behaviour instead
            give_back(err)
        return original_ins(self, node_id, limit, run_id=run_id)

    def get_message_res(self: Any, message_ids: set[str], run_id: int) -> list[Any]:
        ids = set(message_ids)
        if ids:
            try:
                ids -= held_res(self, ids)
            except Exception as err:  # never break delivery: Flower's behaviour instead
                give_back(err)
                ids = set(message_ids)
        return original_res(self, ids, run_id)

    cls.get_message_ins = get_message_ins
    cls.get_message_res = get_message_res
    return True
