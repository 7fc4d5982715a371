"""End to end: record-level DP-SGD in a real 2-site deployment whose sites stop at their budgets.

fedmed-server and two fedmed-client processes (sites A and B) over TLS + site keys on
127.0.0.1, ``dp-mode = "record"`` (the patient is the record). Each site's own ``max-epsilon``
(site config) allows one round but not two; the run asks for a larger ``dp-max-epsilon``, which
a site's budget overrides. Round 2 is refused at both sites and the run ends "privacy budget
exhausted" with round 1's model, evaluated and reported. The epsilon each site reported is
recomputed here with dp-accounting from the record's own parameters, as in
``tests/simulation/test_simulation_dp.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fault_harness import FaultRun, Procs, make_demo_data, write_configs
from fedmed.server.checkpoint import CheckpointStore

from fedmed.io.msd import load_site_dataset, split_cases
from fedmed.security.accountant import LEDGER_FILE, PrivacyLedger

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
SITES = ("A", "B")
# q = 1/2 (1 expected of 2 training patients), sigma 1, 2 steps per round, delta 1e-5:
# epsilon 5.38 after round 1, 7.41 after round 2. Each site has its own budget in between.
BUDGETS = {"A": 6.0, "B": 7.0}
RUN_BUDGET = 20.0  # what the coordinator asks for: more than either site allows
RUN_WAIT = 900.0  # bound on the whole federation; a quiet machine needs ~1 minute
STOP_WAIT = 30.0  # SIGTERM grace per process, then SIGKILL (which the test then reports)
APP = {
    "num-rounds": 3,
    "model": "coplenet",
    "model-norm": "group",  # DP-SGD needs per-record gradients: no batch norm
    "model-features": "4,8,16,32,64",
    "patch-size": "32,32",
    "local-steps": 2,
    "batch-size": 2,
    "val-fraction": 0.2,
    "round-timeout": 300.0,
    "join-timeout": 300.0,
    "out-dir": "out",
    "dp-mode": "record",
    "dp-clip-norm": 1.0,
    "dp-noise-multiplier": 1.0,
    "dp-patients-per-step": 1.0,
    "dp-delta": 1e-5,
    "dp-max-epsilon": RUN_BUDGET,
}


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _watch(procs: Procs, server: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait (bounded) for ``server`` to exit, noting every process under the ones started
    (SuperLink, SuperNodes, apps) meanwhile, so the test can check that they end too."""
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        procs.remember()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=1.0)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> FaultRun:
    """The run, its logs and exit codes; ``notes``: how many processes ran under the ones
    started (SuperLink, SuperNodes, apps) and which of them outlived the stop."""
    root = tmp_path_factory.mktemp("deployment-dp")
    data = make_demo_data(root / "data", sites=len(SITES))
    for site in SITES:  # the premise of BUDGETS: 2 training patients per site
        cases = load_site_dataset(data / f"site-{site}").cases
        train, _ = split_cases(cases, val_fraction=APP["val-fraction"], seed=0)
        assert len(train) == 2, site
    federation, configs = write_configs(
        root, data, allowed=list(SITES), sites={s: data / f"site-{s}" for s in SITES},
        app={**APP, "data-dir": str(data / "holdout")},
    )  # fmt: skip
    for site, config in configs.items():  # each site's own budget, in its own config
        budget = f"max-epsilon = {BUDGETS[site]}\n[connection]"
        config.write_text(config.read_text().replace("[connection]", budget))
    logs = {s: root / f"client-{s}.log" for s in SITES}
    procs = Procs({**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    try:
        server = procs.start(
            [str(BIN / "fedmed-server"), "--config", str(federation)], root / "server.log"
        )
        clients = [
            procs.start([str(BIN / "fedmed-client"), "--site", s, "--config", str(configs[s])],
                        logs[s])
            for s in SITES
        ]  # fmt: skip
        _watch(procs, server, RUN_WAIT)
        server_code = procs.stop(server, timeout=STOP_WAIT)
        site_codes = procs.stop_all(clients, timeout=STOP_WAIT)
        deadline = time.monotonic() + STOP_WAIT
        while procs.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        noted, leftovers = len(procs.seen), procs.alive()
    finally:
        procs.close()
    return FaultRun(
        root=root,
        data=data,
        server_codes=[server_code],
        server_log=_text(root / "server.log"),
        site_codes={s: [code] for s, code in zip(SITES, site_codes, strict=True)},
        site_logs={s: _text(p) for s, p in logs.items()},
        events={},
        notes={"noted": str(noted), "leftovers": " ".join(map(str, leftovers))},
    )


def test_the_run_stops_at_the_sites_budgets_with_round_1s_model(dp_run: FaultRun) -> None:
    assert dp_run.server_codes == [0], dp_run.server_log[-4000:]
    assert "privacy budget exhausted" in dp_run.server_log
    records = dp_run.metrics
    assert [r["round"] for r in records if r["status"] == "ok"] == [1]
    refused = [r for r in records if r["round"] == 2 and r["status"] == "failed"]
    assert refused, records
    for record in refused:
        assert set(record["rejected"]) == set(SITES)
        for site, why in record["rejected"].items():
            # each site refuses on its own budget, not the run's larger dp-max-epsilon
            assert "PrivacyBudgetExhausted" in why and f"max-epsilon {BUDGETS[site]:g}" in why
    (stopped,) = [r for r in records if r["status"] == "stopped"]
    assert stopped["round"] == 2 and "privacy budget exhausted" in stopped["reason"]
    assert not [r for r in records if r["round"] >= 3]
    (evaluation,) = [r for r in records if r["status"] == "evaluation"]
    assert (evaluation["round"], evaluation["failed"]) == (1, {})
    assert CheckpointStore(dp_run.out).verify_chain() == [0, 1]
    # the final model (round 1's) is evaluated on the held-out set and reported
    table = json.loads((dp_run.out / "cross_site.json").read_text())
    assert table["round"] == 1
    assert {e["data"] for e in table["entries"] if "n" in e} == {"holdout"}
    report = (dp_run.out / "report.md").read_text()
    assert "## Differential privacy" in report
    for site in SITES:
        assert f"| 1 | {site} | " in report and f"| 2 | {site} | " not in report
    for site in SITES:  # the sites said why they did not train
        assert "privacy budget exhausted" in dp_run.site_logs[site], site


def test_each_sites_epsilon_is_recomputable_and_within_its_own_budget(
    dp_run: FaultRun, reference_epsilon: Callable[[float, float, int, float], float]
) -> None:
    (round_1,) = [r for r in dp_run.metrics if r["status"] == "ok"]
    assert (round_1["dp"]["mode"], round_1["dp"]["adjacency"]) == ("record", "add-remove")
    assert set(round_1["sites"]) == set(SITES)
    for site, metrics in round_1["sites"].items():
        assert metrics["dp-sample-rate"] == pytest.approx(0.5), site  # 1 of 2 patients
        assert (metrics["dp-steps"], metrics["dp-noise-multiplier"]) == (2, 1.0), site
        assert metrics["dp-delta"] == APP["dp-delta"], site
        reference = reference_epsilon(0.5, 1.0, 2, metrics["dp-delta"])
        assert metrics["dp-epsilon"] == pytest.approx(reference, abs=1e-6), site
        # a fresh site: its whole history is this round, within its own budget
        assert metrics["dp-epsilon-total"] == pytest.approx(reference, abs=1e-6), site
        assert reference < BUDGETS[site] < reference_epsilon(0.5, 1.0, 4, metrics["dp-delta"])
        # under DP a site's reply carries the update, its counts and the DP record: no metrics
        assert "train-loss" not in metrics and "val-dice" not in metrics, site
        # the site's own ledger holds the one round it released, with the same parameters
        ledger = PrivacyLedger.load(dp_run.root / f"site-{site}" / "cache" / LEDGER_FILE)
        (entry,) = ledger.entries
        assert (entry.mode, entry.round, entry.steps) == ("record", 1, 2), site
        assert entry.sample_rate == pytest.approx(metrics["dp-sample-rate"]), site


def test_the_server_and_both_sites_exit(dp_run: FaultRun) -> None:
    assert dp_run.server_codes == [0], dp_run.server_log[-4000:]
    for site, codes in dp_run.site_codes.items():  # SIGTERM: a clean stop within the grace
        assert codes == [130], (site, codes, dp_run.site_logs[site][-2000:])
    # none of the processes under them (SuperLink, SuperNodes, apps) outlived the stop
    assert int(dp_run.notes["noted"]) >= 3 and dp_run.notes["leftovers"] == ""
