"""The SuperLink's SQL state: a longer SQLite lock wait, where Flower reads it."""

from __future__ import annotations

import importlib
import inspect

from fedmed.flower.linkstate import lengthen_sqlite_busy_timeout


def test_sqlite_busy_timeout_is_lengthened_where_flower_reads_it(monkeypatch) -> None:
    sql_mixin = importlib.import_module("flwr.supercore.sql_mixin")
    assert ("busy_timeout", "5000") in sql_mixin.SQLITE_PRAGMAS
    # Flower reads the module global at connect time: that is what the gateway replaces.
    assert "SQLITE_PRAGMAS" in inspect.getsource(sql_mixin._set_sqlite_pragmas)
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)

    lengthen_sqlite_busy_timeout("60000")

    assert dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"] == "60000"
    assert dict(sql_mixin.SQLITE_PRAGMAS)["journal_mode"] == "WAL"
