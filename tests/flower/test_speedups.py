"""fedmed's speed-ups to Flower switch off, with one warning and stock Flower behaviour, when
the installed Flower does not match what they patch (drift simulated on the real flwr modules),
and on request (``FEDMED_FLOWER_WITHOUT``)."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmed.errors import ConfigError
from fedmed.flower import fastpoll, linkstate, liveness, speedups, warmstart
from fedmed.flower.process import flower_env
from fedmed.flower.speedups import SPEEDUPS, WITHOUT_ENV, FlowerDriftWarning

FLWR = r"\(flwr 1\.\d+\.\d+\)"  # every drift warning names the installed version
STOCK = "Flower's stock behaviour applies"


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with all speed-ups on and nothing warned yet in this process."""
    monkeypatch.setattr(speedups, "_OFF", {})
    monkeypatch.delenv(WITHOUT_ENV, raising=False)


@pytest.fixture
def backoff_defaults() -> Iterator[list[dict]]:
    """Flower's pull functions' keyword defaults, restored after the test."""
    module = importlib.import_module(fastpoll.INFLATABLE_MODULE)
    functions = [getattr(module, name) for name in fastpoll.PULL_FUNCTIONS]
    saved = [dict(f.__kwdefaults__) for f in functions]
    yield saved
    for function, defaults in zip(functions, saved, strict=True):
        function.__kwdefaults__.update(defaults)


# ---------------------------------------------------------------------------------- fastpoll


def test_fastpoll_without_a_module_level_time_stays_stock(monkeypatch) -> None:
    module = importlib.import_module(fastpoll.SUPERNODE_MODULE)
    monkeypatch.delattr(module, "time")  # Flower imports `sleep` directly, say

    with pytest.warns(
        FlowerDriftWarning, match=rf"'fastpoll' is off: .*has no module-level `time`.*{FLWR}"
    ) as record:
        patched = fastpoll.cap_supernode_sleep(0.2)
        assert fastpoll.cap_supernode_sleep(0.2) is None  # off for good: no second warning

    assert patched is None and len(record) == 1
    assert not hasattr(module, "time")
    assert "fastpoll" in speedups.off()


def test_fastpoll_whose_idle_wait_changed_leaves_flowers_time_alone(monkeypatch) -> None:
    module = importlib.import_module(fastpoll.SUPERNODE_MODULE)
    monkeypatch.setattr(module, "time", time)
    source = inspect.getsource(module).replace(fastpoll.IDLE_SLEEP, "time.sleep(IDLE_S)")
    monkeypatch.setattr(fastpoll, "source_of", lambda _: source)

    with pytest.warns(FlowerDriftWarning, match=rf"no longer idles with `time.sleep\(3\)`.*{FLWR}"):
        assert fastpoll.cap_supernode_sleep(0.2) is None

    assert module.time is time  # Flower's sleeps: stock


# ----------------------------------------------------------------------------------- backoff


def test_backoff_without_its_keyword_defaults_changes_no_pull(monkeypatch, backoff_defaults):
    module = importlib.import_module(fastpoll.INFLATABLE_MODULE)

    def pull_and_inflate_object_from_tree(*, initial_backoff: float = 1, max_time: float = 1):
        """Flower's puller with a new back-off signature (no ``backoff_cap``)."""

    monkeypatch.setattr(
        module, "pull_and_inflate_object_from_tree", pull_and_inflate_object_from_tree
    )

    with pytest.warns(
        FlowerDriftWarning,
        match=rf"'backoff' is off: .*pull_and_inflate_object_from_tree has no keyword defaults "
        rf"\['backoff_cap', 'max_tries_per_object'\] {FLWR}",
    ):
        assert fastpoll.shorten_pull_backoff() is False

    # all or nothing: the pull that still matches keeps Flower's 1 s doubling to 10 s
    assert module.pull_objects.__kwdefaults__ == backoff_defaults[0]
    assert pull_and_inflate_object_from_tree.__kwdefaults__["initial_backoff"] == 1


# --------------------------------------------------------------------------------- heartbeat


def test_heartbeat_constant_gone_keeps_flowers_interval(monkeypatch) -> None:
    connection, sender = (importlib.import_module(n) for n in liveness.HEARTBEAT_MODULES)
    monkeypatch.setattr(connection, "HEARTBEAT_DEFAULT_INTERVAL", 30.0)
    monkeypatch.delattr(sender, "HEARTBEAT_DEFAULT_INTERVAL")

    with pytest.warns(
        FlowerDriftWarning,
        match=rf"'heartbeat' is off: flwr.supercore.heartbeat has no HEARTBEAT_DEFAULT_INTERVAL "
        rf"{FLWR}; .*30 s",
    ):
        assert liveness.set_heartbeat_interval(10.0) == []

    assert connection.HEARTBEAT_DEFAULT_INTERVAL == 30.0  # declared and sent: Flower's


def test_heartbeat_out_of_range_is_still_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"within \[10, 1800\] s"):
        liveness.set_heartbeat_interval(5.0)


# ---------------------------------------------------------------------------- sqlite timeout


def _no_busy_timeout(sql_mixin, monkeypatch) -> None:
    pragmas = tuple(p for p in sql_mixin.SQLITE_PRAGMAS if p[0] != "busy_timeout")
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", pragmas)


def _pragmas_not_read(sql_mixin, monkeypatch) -> None:
    def _set_sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
        """Flower setting its pragmas from somewhere else."""

    monkeypatch.setattr(sql_mixin, "_set_sqlite_pragmas", _set_sqlite_pragmas)


@pytest.mark.parametrize(
    ("drift", "missing"),
    [
        (_no_busy_timeout, "SQLITE_PRAGMAS has no busy_timeout pair"),
        (_pragmas_not_read, "_set_sqlite_pragmas no longer reads them"),
    ],
    ids=["pair-gone", "not-read"],
)
def test_sqlite_timeout_drift_leaves_flowers_pragmas(drift, missing, monkeypatch) -> None:
    sql_mixin = importlib.import_module(linkstate.SQL_MIXIN)
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    drift(sql_mixin, monkeypatch)
    before = sql_mixin.SQLITE_PRAGMAS

    with pytest.warns(FlowerDriftWarning, match=rf"'sqlite-timeout' is off: .*{missing} {FLWR}"):
        assert linkstate.lengthen_sqlite_busy_timeout() is False

    assert sql_mixin.SQLITE_PRAGMAS is before


# --------------------------------------------------------------------------------- warmstart


def test_warm_start_with_threads_after_preload_does_not_listen(tmp_path, backoff_defaults):
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="flwr-on-import")  # as if flwr started it
    thread.start()
    try:  # earlier tests in this worker may have left threads of their own: at least ours
        with pytest.warns(
            FlowerDriftWarning,
            match=rf"'warmstart' is off: [1-9][0-9]* thread\(s\) run after import.*{FLWR}",
        ):
            warmstart.serve(tmp_path / "s.sock", tmp_path / "pins")  # returns instead of serving
    finally:
        stop.set()
        thread.join()

    assert not (tmp_path / "s.sock").exists()  # the wrapper runs each flwr-clientapp cold


def test_warm_start_switched_off_exits_at_once_without_a_socket(tmp_path: Path) -> None:
    env = {**os.environ, WITHOUT_ENV: "warmstart"}
    result = subprocess.run(
        [sys.executable, "-m", "fedmed.flower.warmstart", str(tmp_path / "s.sock"), "pins"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "s.sock").exists()
    assert "Warning" not in result.stderr  # off on request: no drift warning


# ----------------------------------------------------------------------- switched off by env


def test_all_switched_off_patches_nothing_and_warns_nothing(monkeypatch, backoff_defaults) -> None:
    monkeypatch.setenv(WITHOUT_ENV, "all")
    sql_mixin = importlib.import_module(linkstate.SQL_MIXIN)
    pragmas = sql_mixin.SQLITE_PRAGMAS
    supernode = importlib.import_module(fastpoll.SUPERNODE_MODULE)

    # no warning may escape here: pytest turns warnings into errors
    assert fastpoll.cap_supernode_sleep(0.2) is None
    assert fastpoll.shorten_pull_backoff() is False
    assert liveness.set_heartbeat_interval(10.0) == []
    assert linkstate.lengthen_sqlite_busy_timeout() is False

    assert supernode.time is time and sql_mixin.SQLITE_PRAGMAS is pragmas
    assert (
        importlib.import_module(fastpoll.INFLATABLE_MODULE).pull_objects.__kwdefaults__
        == (backoff_defaults[0])
    )
    assert set(speedups.off()) == set(SPEEDUPS)


def test_one_switched_off_leaves_the_others_on_and_comes_back_on(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(WITHOUT_ENV, " warmstart ,fastpoll")
    assert speedups.switched_off() == {"warmstart", "fastpoll"}
    assert not speedups.enabled("fastpoll") and speedups.enabled("backoff")

    monkeypatch.setenv(WITHOUT_ENV, "")  # the bench restarts a federation with all on
    assert speedups.enabled("fastpoll") and speedups.off() == {}


def test_unknown_speedup_name_is_a_config_error_before_any_flower_process(
    monkeypatch, tmp_path
) -> None:
    monkeypatch.setenv(WITHOUT_ENV, "fastpol")
    with pytest.raises(ConfigError, match=r"FEDMED_FLOWER_WITHOUT='fastpol' names \['fastpol'\]"):
        speedups.enabled("fastpoll")
    with pytest.raises(ConfigError, match="use 'all' or a comma-separated list of fastpoll, "):
        flower_env(tmp_path)  # what every fedmed command runs before it starts Flower


def test_every_speedup_says_what_flower_does_without_it() -> None:
    assert set(SPEEDUPS) == {"fastpoll", "backoff", "warmstart", "heartbeat", "sqlite-timeout"}
    assert all(ours and stock for ours, stock in SPEEDUPS.values())
    with pytest.warns(FlowerDriftWarning, match="'backoff' is off: something moved"):
        speedups.drifted("backoff", "something moved")
        speedups.drifted("backoff", "again")  # warned once per process
    assert speedups.off() == {"backoff": "something moved"}


def test_drift_warning_text_names_speedup_symbol_version_and_stock() -> None:
    with pytest.warns(FlowerDriftWarning) as record:
        speedups.drifted("heartbeat", "flwr.supernode HEARTBEAT_DEFAULT_INTERVAL is gone")
    (warning,) = record
    text = str(warning.message)
    assert text.startswith(
        "fedmed speed-up 'heartbeat' is off: flwr.supernode HEARTBEAT_DEFAULT_INTERVAL is gone"
    )
    assert STOCK in text and "flwr 1." in text
