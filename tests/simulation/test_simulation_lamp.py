"""End to end: a ``fedmed-sim`` federation where site-A trains LAMP split over two CPU stages
(``--site-devices cpu,cpu cpu``) and site-B on one device, with the run's preprocessing plan.

Two rounds complete with both sites' replies (same state_dict keys whatever the split, so
they aggregate), and every round checkpoint records the plan. That the partitioned forward
equals the unpartitioned one (1e-5) is tests/nets/test_lamp.py's
``test_pipelined_outputs_and_gradients_match_unpartitioned_model``.
"""

from __future__ import annotations

import json

import pytest
from sim_harness import E2E_MARKS, run_sim, short_folder, sim_toml

from fedmed.plan import PreprocessingPlan

pytestmark = E2E_MARKS


@pytest.fixture(scope="module")
def lamp_run(demo_root):
    with short_folder("fslamp-") as short:
        config = sim_toml(
            short,
            demo_root,
            app='num-rounds = 2\nmodel = "lamp_unet"\nmodel-features = "4,8,16"\n'
            'patch-size = "16,16,16"\nlocal-steps = 2\nbatch-size = 2\nval-fraction = 0.34\n'
            'cross-site-evaluation = false\nfinetune-epochs = 0\ntarget-spacing = "12,12,20"\n',
        )
        # --verbose: the sites' logs reach simulation.log (they say how LAMP was split)
        argv = ["--config", str(config), "--site-devices", "cpu,cpu", "cpu", "-v"]
        code, printed = run_sim(argv)
        yield code, short / "out" / "runs" / "fedavg", printed


def test_a_lamp_site_split_over_two_devices_and_a_single_device_site_complete_two_rounds(
    lamp_run,
):
    code, run, printed = lamp_run
    assert code == 0, printed[-3000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r.get("status") == "ok"]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert set(record["sites"]) == {"site-A", "site-B"}, record
        assert not record["rejected"] and not record["missing"]
        assert all(0.0 <= m["val-dice"] <= 1.0 for m in record["sites"].values())
        assert record["holdout"]["dice"] is not None  # the server evaluates with the plan too
    log = (run / "simulation.log").read_text(encoding="utf-8", errors="replace")
    assert "site-A: lamp_unet split over cpu,cpu" in log
    assert "site-B: lamp_unet split" not in log  # one device: one stage


def test_every_round_checkpoint_records_the_runs_plan(lamp_run):
    _, run, _ = lamp_run
    for server_round in (0, 1, 2):
        meta = json.loads(
            (run / "checkpoints" / f"round-{server_round:04d}" / "meta.json").read_text()
        )
        plan = PreprocessingPlan.from_metadata(meta, source="meta.json")
        assert plan is not None
        assert (plan.model, plan.target_spacing, plan.patch_size) == (
            "lamp_unet",
            (12.0, 12.0, 20.0),
            (16, 16, 16),
        )
