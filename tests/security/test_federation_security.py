"""End to end on Flower's simulation engine with the security options on: signed models that
the sites verify against the federation CA (FEDMED_SERVER_CA), client-side DP with epsilon in
metrics.jsonl and the report, the server's audit log, and `fedmed verify` over the result."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from fedmed.client.app import make_client_app
from fedmed.client.runtime import PartitionSites
from fedmed.server.app import make_server_app
from fedmed.server.report import MetricsLog
from flwr.simulation import run_simulation

from fedmed.cli.main import main as fedmed_main
from fedmed.errors import FederationError
from fedmed.runsettings.settings import RunSettings
from fedmed.security.accountant import gaussian_epsilon
from fedmed.security.pki import write_pki

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _simulate(settings: RunSettings, sites: PartitionSites, ca: Path, work: Path) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX paths: at most 107 bytes
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TMPDIR", ray_tmp)
    mp.setenv("FLWR_HOME", str(work / "flwr"))
    mp.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    mp.setenv("FEDMED_SERVER_CA", str(ca))
    try:
        run_simulation(
            server_app=make_server_app(settings),
            client_app=make_client_app(resolve_site=sites),
            num_supernodes=len(sites.folders),
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": 2, "include_dashboard": False},
            },
        )
    finally:
        mp.undo()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _settings(out: Path, **extra: object) -> RunSettings:
    return RunSettings(
        num_rounds=2,
        min_sites=2,
        model_features="4,8,16,32,64",
        patch_size="32,32",
        local_steps=1,
        batch_size=2,
        val_fraction=0.34,
        out_dir=str(out),
        join_timeout=300.0,  # a starved CI machine may take 120 s to start the apps
        round_timeout=300.0,  # a fresh Ray actor on a loaded CI runner is slow to start
        retry_failed_rounds=0,
        **extra,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    write_pki(ours, server_hosts=["localhost"], sites=["A"])
    write_pki(theirs, server_hosts=["localhost"], sites=["A"])
    return ours, theirs


def test_signed_dp_federation_is_verifiable(demo_root, pki, tmp_path, capsys) -> None:
    # Prepare
    certs, _ = pki
    sites = PartitionSites((str(demo_root / "site-A"), str(demo_root / "site-B")))
    settings = _settings(
        tmp_path / "out",
        signing_dir=str(certs),
        dp_clip_norm=1.0,
        dp_noise_multiplier=2.0,
        dp_delta=1e-5,
        dp_max_epsilon=10.0,
    )

    # Execute
    _simulate(settings, sites, certs / "ca.pem", tmp_path)

    # Assert
    records = [r for r in MetricsLog(settings.out_dir).read() if r.get("status") == "ok"]
    assert [r["round"] for r in records] == [1, 2]
    eps = [r["dp"]["epsilon"] for r in records]
    expected = [gaussian_epsilon(noise_multiplier=2.0, rounds=n, delta=1e-5) for n in (1, 2)]
    assert eps == pytest.approx(expected, rel=1e-5)
    assert "epsilon" in (tmp_path / "out" / "report.md").read_text()
    assert (
        fedmed_main(
            ["verify", settings.out_dir, "--ca", str(certs / "ca.pem"), "--require-signatures"]
        )
        == 0
    )
    assert "rounds 0..2 chained, 3 signed" in capsys.readouterr().out
    server_audit = [
        json.loads(x) for x in (tmp_path / "out" / "audit.jsonl").read_text().splitlines()
    ]
    sent = [x for x in server_audit if x["event"] == "send"]
    done = [x for x in server_audit if x["event"] == "round"]
    assert [x["round"] for x in sent] == [1, 2]
    assert len(done[0]["received_sha256"]) == 2


def test_sites_refuse_a_model_signed_outside_the_federation(demo_root, pki, tmp_path) -> None:
    # Prepare: the server signs with a key of another CA; the sites trust only ours
    certs, theirs = pki
    sites = PartitionSites((str(demo_root / "site-A"), str(demo_root / "site-B")))
    settings = _settings(tmp_path / "out", signing_dir=str(theirs))

    # Execute
    with pytest.raises(FederationError, match="fewer than min-sites 2 valid replies"):
        _simulate(settings, sites, certs / "ca.pem", tmp_path)

    # Assert
    failed = [r for r in MetricsLog(settings.out_dir).read() if r.get("status") == "failed"]
    assert len(failed) == 1
    reasons = list(failed[0]["rejected"].values())
    assert len(reasons) == 2
    assert all(r.startswith("site error 2: SignatureError at site site-") for r in reasons)
