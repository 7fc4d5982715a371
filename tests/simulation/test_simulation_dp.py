"""End to end: a record-level DP federation in ``fedmed-sim`` whose sites stop at their budget.

2 sites (2 training patients each) x DP-SGD with the patient as the record; every site's own
``max-epsilon`` allows one round but not two, so round 2 is refused at both sites and the run
ends "privacy budget exhausted" with round 1's model, evaluated and reported. The epsilon each
site reported is recomputed here with dp-accounting from the record's own parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedmed.server.checkpoint import CheckpointStore
from sim_harness import E2E_MARKS, run_sim, short_folder, sim_toml

from fedmed.io.msd import load_site_dataset, split_cases

pytestmark = E2E_MARKS

SITE_BUDGET = 6.5  # q = 1/2, sigma 1, 2 steps per round: 5.38 after round 1, 7.41 after 2


@pytest.fixture(scope="module")
def dp_run(demo_root):
    with short_folder("fsdp-") as short:
        config = sim_toml(
            short,
            demo_root,
            tables=f"[sites]\nmax-epsilon = {SITE_BUDGET}\n",
            app='num-rounds = 3\nmodel = "coplenet"\nmodel-features = "4,8,16,32,64"\n'
            'patch-size = "32,32"\nlocal-steps = 2\nbatch-size = 2\nval-fraction = 0.2\n'
            'dp-mode = "record"\ndp-clip-norm = 1.0\ndp-noise-multiplier = 1.0\n'
            'dp-patients-per-step = 1.0\ndp-delta = 1e-5\nmodel-norm = "group"\n',
        )
        for site in ("site-A", "site-B"):  # the premise of SITE_BUDGET: 2 training patients
            cases = load_site_dataset(demo_root / site).cases
            train, _ = split_cases(cases, val_fraction=0.2, seed=0)
            assert len(train) == 2, site
        code, printed = run_sim(["--config", str(config)])
        yield code, short / "out" / "runs" / "fedavg", printed


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_run_stops_at_the_sites_budgets_with_round_1s_model(dp_run):
    code, run, printed = dp_run
    assert code == 0, printed[-3000:]
    assert "[fedavg] stopped before round 2: privacy budget exhausted" in printed
    records = _records(run)
    ok = [r for r in records if r["status"] == "ok"]
    assert [r["round"] for r in ok] == [1]
    refused = [r for r in records if r["round"] == 2 and r["status"] == "failed"]
    assert refused and all(
        set(r["rejected"]) == {"site-A", "site-B"}
        and all("PrivacyBudgetExhausted" in why for why in r["rejected"].values())
        for r in refused
    )
    stopped = [r for r in records if r["status"] == "stopped"]
    assert len(stopped) == 1 and "above its max-epsilon" not in stopped[0]["reason"]
    assert CheckpointStore(run).verify_chain() == [0, 1]
    # the final model is evaluated on the held-out set; the sites are not asked under DP
    table = json.loads((run / "cross_site.json").read_text())
    assert table["round"] == 1
    assert {e["data"] for e in table["entries"] if "n" in e} == {"holdout"}


def test_each_sites_epsilon_is_recomputable_and_within_its_budget(dp_run, reference_epsilon):
    _, run, _ = dp_run
    (round_1,) = [r for r in _records(run) if r["status"] == "ok"]
    assert (round_1["dp"]["mode"], round_1["dp"]["adjacency"]) == ("record", "add-remove")
    assert set(round_1["sites"]) == {"site-A", "site-B"}
    for site, metrics in round_1["sites"].items():
        assert metrics["dp-sample-rate"] == pytest.approx(0.5), site  # 1 of 2 patients
        assert metrics["dp-steps"] == 2 and metrics["dp-noise-multiplier"] == 1.0
        reference = reference_epsilon(0.5, 1.0, 2, metrics["dp-delta"])
        assert metrics["dp-epsilon"] == pytest.approx(reference, rel=1e-6), site
        assert metrics["dp-epsilon-total"] <= SITE_BUDGET
    # under DP a site's reply carries the update, its counts and the DP record: no metrics
    for metrics in round_1["sites"].values():
        assert "val-dice" not in metrics and "train-loss" not in metrics


NOISE_MULTIPLIER, CLIP = 1.0, 0.5


@pytest.fixture(scope="module")
def distributed_run(demo_root):
    """3 sites, one SecAgg+ round with site-level DP: each site adds its share of the noise."""
    with short_folder("fsdd-") as short:
        config = sim_toml(
            short,
            demo_root,
            sites=("site-A", "site-B", "site-C"),
            app='num-rounds = 1\nmodel = "coplenet"\nmodel-features = "4,8,16,32,64"\n'
            'patch-size = "32,32"\nlocal-steps = 2\nbatch-size = 2\nmodel-norm = "group"\n'
            'secure-aggregation = true\ndp-mode = "site"\n'
            f"dp-clip-norm = {CLIP}\ndp-noise-multiplier = {NOISE_MULTIPLIER}\n",
        )
        code, printed = run_sim(["--config", str(config)])
        yield code, short / "out" / "runs" / "fedavg", printed


def test_secure_aggregation_with_distributed_noise_carries_the_intended_noise(distributed_run):
    code, run, printed = distributed_run
    assert code == 0, printed[-3000:]
    (round_1,) = [r for r in _records(run) if r["status"] == "ok"]
    assert set(round_1["sites"]) == {"site-A", "site-B", "site-C"}
    assert round_1["dp"]["mode"] == "site" and round_1["dp"]["epsilon"] > 0
    # equal weights under distributed DP: the sum must carry sigma C, each site adds its share
    assert {m["num-examples"] for m in round_1["sites"].values()} == {1.0}
    # the global model moved by the mean of 3 clipped updates (norm <= C in ~10^5 coordinates)
    # plus the summed noise / 3: per coordinate std sigma C / 3
    store = CheckpointStore(run)
    before, after = store.load(0).weights, store.load(1).weights
    params = [k for k in before if not k.endswith(("running_mean", "running_var", "tracked"))]
    delta = np.concatenate([(after[k] - before[k]).ravel() for k in params])
    assert delta.size > 10_000
    assert np.std(delta) == pytest.approx(NOISE_MULTIPLIER * CLIP / 3, rel=0.1)
