"""A SuperLink speed-up inside Flower's SQL state: a longer SQLite lock wait.

:func:`lengthen_sqlite_busy_timeout`: Flower waits 5 s for SQLite's write lock, then answers 500
("database is locked"); its own executor dies on such an answer and the run stalls (seen on a
loaded 2-core machine). The SuperLink's connections wait 60 s instead.

It replaces a Flower internal (``flwr.supercore.sql_mixin.SQLITE_PRAGMAS``);
``tests/flower/test_linkstate.py`` and ``tests/flower/test_flower_contract.py`` fail if it
moves. :mod:`fedmed.flower.gateway` applies it before it builds the SuperLink. It is a speed-up
(:mod:`fedmed.flower.speedups`: ``sqlite-timeout``): it checks first that Flower still has what
it replaces and otherwise changes nothing (one warning, Flower's behaviour).

fedmed once also held back a message until all its objects had arrived (hand-written SQL over
Flower's tables). The quiet-machine ablation (``bench/federation.py --ablate``) measured
0.24 s per round for it beside 1.92 s overhead in all, while the overhead goal (a third of
stock Flower's) holds with a wide margin without it, so it went: Flower's own delivery with
the short pull back-off (``backoff``) applies.

Example:
    >>> lengthen_sqlite_busy_timeout()       # then build Flower's SuperLink app
"""

from __future__ import annotations

from fedmed.flower.speedups import drifted, enabled, import_for, source_of

__all__ = ["SQLITE_BUSY_TIMEOUT_MS", "SQL_MIXIN", "lengthen_sqlite_busy_timeout"]

# Flower waits 5 s for SQLite's write lock, then answers 500 ("database is locked"); its own
# executor dies on such an answer and the run stalls. Seen on a loaded 2-core machine.
SQLITE_BUSY_TIMEOUT_MS = "60000"
SQL_MIXIN = "flwr.supercore.sql_mixin"


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
