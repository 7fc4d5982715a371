"""The server crashes mid-run (fedmed-server, its SuperLink and the server app SIGKILLed while
round 2 is in flight) and is started again with the same config, state and output folders:
the run resumes from the last checkpoint, no round lost or repeated. Real processes, TLS."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fault_harness import FaultRun, server_restart_run
from fedmed.server.checkpoint import CheckpointStore
from safetensors.numpy import load_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> FaultRun:
    return server_restart_run(tmp_path_factory.getbasetemp() / "server-restart")


def test_killed_server_was_really_gone(run: FaultRun) -> None:
    assert run.server_codes[0] == -9
    killed = json.loads((run.root / "killed-pids.json").read_text())
    assert len(killed) >= 3  # fedmed-server, the SuperLink, its executor / server app
    first, _ = run.server_log.split("FEDMED-E2E restart of fedmed-server")
    assert "resuming after round" not in first


def test_restarted_server_resumes_after_the_last_checkpoint(run: FaultRun) -> None:
    assert run.server_codes[1] == 0, run.server_log[-4000:]
    second = run.server_log.split("FEDMED-E2E restart of fedmed-server")[1]
    resumed = int(second.split("resuming after round ")[1].split()[0])
    assert resumed >= 1
    assert "checkpoint round 0 written" not in second
    for round_ in range(1, resumed + 1):  # nothing done before the crash is done again
        assert f"round {round_} done" not in second
    assert "round 3 done" in second


def test_no_round_lost_or_repeated(run: FaultRun) -> None:
    store = CheckpointStore(run.out)
    assert store.verify_chain() == [0, 1, 2, 3]  # hashes and parent links intact
    ok = [r["round"] for r in run.metrics if r.get("status") in ("initial", "ok")]
    assert ok == [0, 1, 2, 3]
    assert store.load_latest().round == 3
    for round_ in store.rounds():
        weights = load_file(str(store.round_dir(round_) / "weights.safetensors"))
        assert all(np.isfinite(w).all() for w in weights.values())
    last = [r for r in run.metrics if r.get("status") == "ok"][-1]
    assert set(last["sites"]) == {"A", "B"}
