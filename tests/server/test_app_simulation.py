"""End to end on Flower's simulation engine: 2 sites x 2 rounds of a small COPLE-Net, then a
restart that resumes from the last checkpoint (no round lost or repeated)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fedmed.client.app import make_client_app
from fedmed.client.runtime import PartitionSites
from fedmed.server.app import make_server_app
from fedmed.server.checkpoint import CheckpointStore
from fedmed.server.federation import train_config
from fedmed.server.report import MetricsLog, completed_records
from flwr.simulation import run_simulation

from fedmed.globalmodel import build_network, local_norm_keys
from fedmed.runsettings.settings import RunSettings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    # Ray's worker machinery leaks /dev/null handles that the GC reports as ResourceWarning
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _simulate(settings: RunSettings, folders: tuple[str, ...], *, share: bool = False) -> None:
    run_simulation(
        server_app=make_server_app(settings),
        client_app=make_client_app(resolve_site=PartitionSites(folders, share_models=share)),
        num_supernodes=len(folders),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )


@pytest.fixture(scope="module")
def simulated(demo_root, tmp_path_factory):
    """Run 2 rounds, then the same run with num-rounds 3 (a restart that must resume), whose
    sites let their own models travel (``share-models``) for the end-of-run evaluation."""
    work = tmp_path_factory.mktemp("sim")
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # AF_UNIX paths: <= 107 bytes
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TMPDIR", str(ray_tmp))
    mp.setenv("FLWR_HOME", str(work / "flwr"))
    # silences Ray's FutureWarning about GPU env vars (pytest turns warnings into errors)
    mp.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    settings = RunSettings(
        num_rounds=2,
        min_sites=2,
        model_features="4,8,16,32,64",
        patch_size="32,32",
        local_steps=2,
        batch_size=2,
        val_fraction=0.34,
        data_dir=str(demo_root / "holdout"),
        out_dir=str(work / "out"),
        join_timeout=300.0,  # a starved CI machine may take 120 s to start the apps
        # generous: a round takes seconds here, but minutes on a loaded 2-core CI runner; a
        # failed attempt is retried (and tolerated below)
        round_timeout=300.0,
    )
    folders = (str(demo_root / "site-A"), str(demo_root / "site-B"))
    try:
        _simulate(settings, folders)
        first = {
            "records": MetricsLog(settings.out_dir).read(),
            "round2": CheckpointStore(settings.out_dir).load(2),
        }
        _simulate(RunSettings(**{**settings.__dict__, "num_rounds": 3}), folders, share=True)
    finally:
        mp.undo()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return settings, first


def _completed(records: list[dict]) -> list[dict]:
    """The initial and ok records. A loaded CI runner may fail an attempt (a Ray worker too slow
    or lost), which the federation retries: such a record must name the sites that failed it."""
    for record in records:
        if record["status"] == "failed":
            assert record["rejected"] or record["missing"], record
    return completed_records(records)


def test_two_rounds_are_logged_with_both_sites(simulated):
    _, first = simulated
    records = _completed(first["records"])
    assert [(r["round"], r["status"]) for r in records] == [(0, "initial"), (1, "ok"), (2, "ok")]
    for record in records[1:]:
        assert set(record["sites"]) == {"site-A", "site-B"}
        assert record["rejected"] == {} and record["missing"] == []
        assert 0.0 <= record["holdout"]["dice"] <= 1.0
        assert [c["case"] for c in record["holdout"]["cases"]] == [
            "holdout_patient_000",
            "holdout_patient_001",
        ]


def test_checkpoints_form_a_hash_chain_with_latest_and_best(simulated):
    settings, _ = simulated
    store = CheckpointStore(settings.out_dir)
    assert store.verify_chain() == [0, 1, 2, 3]
    latest = json.loads((store.root / "latest.json").read_text())
    assert latest["round"] == 3 and latest["hash"] == store.load(3).hash
    assert (store.root / "best.json").is_file()
    assert store.load(2).meta["config_hash"] == settings.identity_hash()


def test_restart_resumes_after_the_last_round(simulated):
    settings, first = simulated
    records = _completed(MetricsLog(settings.out_dir).read())
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    store = CheckpointStore(settings.out_dir)
    # round 3 started from round 2's global weights, which the restart left untouched
    assert store.load(3).parent_hash == first["round2"].hash
    assert store.load(2).hash == first["round2"].hash


def test_report_is_drawn(simulated):
    settings, _ = simulated
    text = (settings.out_path / "report.md").read_text()
    failed = [r for r in MetricsLog(settings.out_dir).read() if r["status"] == "failed"]
    assert f"Completed rounds: 3; failed attempts: {len(failed)}." in text
    for png in ("holdout_dice.png", "site_dice.png"):
        assert (settings.out_path / png).stat().st_size > 1000


def test_the_end_of_run_evaluation_writes_the_cross_site_table(simulated):
    settings, _ = simulated
    data = json.loads((settings.out_path / "cross_site.json").read_text())
    assert data["round"] == 3 and data["sites"] == ["site-A", "site-B"] and data["missing"] == []
    entries = data["entries"]
    required = {"model", "data", "metric", "n", "status"}
    assert all(required <= set(e) for e in entries)
    # one validation case per site: below the default disclosure floor, nothing but its count
    val = [e for e in entries if e["data"].startswith("val:")]
    assert {e["data"] for e in val} == {"val:site-A", "val:site-B"}
    assert all(e["status"] == "too few cases" and "mean" not in e for e in val)
    # the sites shared their own models: each fine-tuned model is scored on the other site's
    # split and on the server's held-out set, next to the global models
    assert ("finetuned@site-A", "val:site-B") in {(e["model"], e["data"]) for e in val}
    assert ("finetuned@site-B", "val:site-A") in {(e["model"], e["data"]) for e in val}
    holdout = {(e["model"], e["metric"]): e for e in entries if e["data"] == "holdout"}
    final = holdout["global-final", "dice"]
    assert final["n"] == 2 and final["ci_low"] <= final["mean"] <= final["ci_high"]
    assert ("global-best", "dice") in holdout
    assert {m for m, _ in holdout} == {
        "global-final", "global-best", "finetuned@site-A", "finetuned@site-B"
    }  # fmt: skip
    assert holdout["finetuned@site-A", "dice"]["n"] == 2
    # its hash is in the audit chain, its heatmap and table in the report
    digest = hashlib.sha256((settings.out_path / "cross_site.json").read_bytes()).hexdigest()
    audit = [
        json.loads(line) for line in (settings.out_path / "audit.jsonl").read_text().splitlines()
    ]
    assert any(line.get("sha256") == digest for line in audit)
    assert (settings.out_path / "cross_site.png").stat().st_size > 1000
    assert "## Cross-site evaluation" in (settings.out_path / "report.md").read_text()


def test_the_best_checkpoint_is_chosen_on_validation_data(simulated):
    settings, _ = simulated
    records = MetricsLog(settings.out_dir).read()
    scored = {r["selection"]["round"]: r["selection"] for r in records if r.get("selection")}
    assert set(scored) == {0, 1, 2, 3}
    best = json.loads((CheckpointStore(settings.out_dir).root / "best.json").read_text())
    # the best validation score, whatever the held-out (test) Dice of the rounds says
    top = max(scored.values(), key=lambda s: s["val-dice"])
    assert best["score"] == pytest.approx(top["val-dice"])


def test_fedbn_keeps_only_statistics_at_the_sites(
    demo_root, tmp_path_factory, monkeypatch, short_ray_tmpdir
):
    # Prepare
    work = tmp_path_factory.mktemp("bn")
    monkeypatch.setenv("RAY_TMPDIR", str(short_ray_tmpdir))
    monkeypatch.setenv("FLWR_HOME", str(work / "flwr"))
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    settings = RunSettings(
        num_rounds=1,
        strategy="fedprox",
        proximal_mu=0.01,
        fedbn=True,
        model_features="4,8,16,32,64",
        patch_size="32,32",
        local_steps=2,
        batch_size=2,
        data_dir=str(demo_root / "holdout"),
        out_dir=str(work / "out"),
        join_timeout=300.0,  # a starved CI machine may take 120 s to start the apps
        round_timeout=300.0,
    )
    # Execute
    _simulate(settings, (str(demo_root / "site-A"), str(demo_root / "site-B")))
    # Assert: the statistics of the global model are the initial ones, the rest was trained,
    # the normalization layers' affine weights included (SiloBN: the global model exists)
    store = CheckpointStore(settings.out_dir)
    initial, trained = store.load(0).weights, store.load(1).weights
    model = build_network(train_config(settings, 0))
    stats = local_norm_keys(model)
    assert all(np.array_equal(initial[k], trained[k]) for k in stats)
    affine = {
        k for k in initial if k.endswith(".weight") and k.replace("weight", "running_var") in stats
    }
    assert affine and all(not np.array_equal(initial[k], trained[k]) for k in affine)
    record = completed_records(MetricsLog(settings.out_dir).read())[-1]
    assert record["status"] == "ok" and set(record["sites"]) == {"site-A", "site-B"}
    assert record["holdout"]["norm-statistics"] == "held-out images (AdaBN)"
