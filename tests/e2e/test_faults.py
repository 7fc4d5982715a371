"""Site faults end to end: a site SIGKILLed mid-round, a site with a broken data folder, a site
sending NaN and wrong-shaped weights; real fedmed-server / fedmed-client processes over TLS.

One federation (``fault_harness.site_fault_run``, shared with ``test_privacy.py``) covers all
of them; see the harness docstring for the timeline.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fault_harness import HEARTBEAT_S, ROUND_TIMEOUT, FaultRun, site_fault_run
from fedmed.server.checkpoint import CheckpointStore
from safetensors.numpy import load_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> FaultRun:
    return site_fault_run(tmp_path_factory.getbasetemp() / "site-faults")


def _records(run: FaultRun, round_: int) -> list[dict]:
    return [r for r in run.metrics if r.get("round") == round_]


def test_federation_completes_every_round_once(run: FaultRun) -> None:
    assert run.server_codes == [0], run.server_log[-4000:]
    ok = [r["round"] for r in run.metrics if r.get("status") == "ok"]
    assert ok == [1, 2, 3, 4]
    assert CheckpointStore(run.out).verify_chain() == [0, 1, 2, 3, 4]


def test_bad_data_site_fails_fast_with_the_report_and_others_go_on(run: FaultRun) -> None:
    assert run.site_codes["D"] == [4]
    assert run.events["D-exited"] - run.events["start"] < 60
    log = run.site_logs["D"]
    broken = Path(run.notes["broken-label"])
    assert "data folder" in log and "problem(s)" in log
    assert broken.name in log
    assert "SuperNode pid" not in log  # never joined
    joined = set().union(*(r["sites"] for r in run.metrics if r.get("status") == "ok"))
    assert joined == {"A", "B", "C"}


def test_nan_weights_are_dropped_with_the_reason(run: FaultRun) -> None:
    # C's reply is NaN in every attempt of round 1 (a saturated machine may need two)
    attempts = _records(run, 1)
    assert any("NaN" in r["rejected"].get("C", "") for r in attempts)
    assert all("C" not in r["sites"] for r in attempts)
    assert [r["status"] for r in attempts][-1] == "ok"
    assert set(attempts[-1]["sites"]) == {"A", "B"}
    assert "reply of site C dropped" in run.server_log
    assert "holds NaN or infinite values" in run.server_log
    for round_ in CheckpointStore(run.out).rounds():
        weights = load_file(
            str(run.out / "checkpoints" / f"round-{round_:04d}" / "weights.safetensors")
        )
        assert all(np.isfinite(w).all() for w in weights.values()), round_


def test_wrong_shape_and_killed_site_fail_the_attempt_which_is_retried(run: FaultRun) -> None:
    attempts = _records(run, 2)
    failed, ok = attempts[0], attempts[-1]
    # attempt 1: C's reply has a wrong shape, B was SIGKILLed mid-round: 1 valid < min-sites 2
    assert failed["status"] == "failed" and failed["attempt"] == 1
    assert set(failed["sites"]) == {"A"}
    assert "shape" in failed["rejected"]["C"]
    assert "B" in failed["missing"] or "B" in failed["rejected"]
    assert "round 2 attempt 1 failed: 1 valid replies, min-sites is 2" in run.server_log
    # the failed attempt counts for nothing: one checkpoint per round, the next attempt decides
    assert [r["status"] for r in attempts].count("ok") == 1
    assert ok["attempt"] >= 2


def test_round_completes_without_the_killed_site_within_the_timeout(run: FaultRun) -> None:
    ok = _records(run, 2)[-1]
    assert ok["status"] == "ok"
    assert set(ok["sites"]) == {"A", "C"}
    # bounded by round-timeout (plus the last poll, which takes long on a saturated machine)
    assert ok["duration-s"] <= ROUND_TIMEOUT * 1.5
    assert run.site_codes["B"][0] == -9  # SIGKILL


def test_killed_site_restarts_and_trains_in_a_later_round(run: FaultRun) -> None:
    later = [r for r in run.metrics if r.get("status") == "ok" and r["round"] >= 3]
    assert any("B" in r["sites"] for r in later), later
    restarted = run.site_logs["B"].split("FEDMED-E2E restart of site B")[1]
    assert "SuperNode pid" in restarted
    assert "site B round 3: training" in restarted or "site B round 4: training" in restarted


def test_sites_declare_their_configured_heartbeat_interval(run: FaultRun) -> None:
    # [connection] heartbeat-interval reached Flower: the SuperLink expects a heartbeat from
    # each site every HEARTBEAT_S (Flower's default 30 s), and counts it gone after twice that
    database = run.root / "state" / "superlink.db"
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        intervals = [row[0] for row in db.execute("SELECT heartbeat_interval FROM node")]
    assert len(intervals) == 3  # A, B, C registered; D never joined
    assert set(intervals) == {HEARTBEAT_S}
