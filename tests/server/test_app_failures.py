"""The round loop's failure paths on Flower's simulation engine: too few sites joined, and
rounds whose replies are errors (failed, retried, then a clear FederationError)."""

from __future__ import annotations

import pytest
from fedmed.client.app import PartitionSites, make_client_app
from fedmed.server.app import make_server_app
from fedmed.server.report import MetricsLog
from fedmed.server.settings import RunSettings
from flwr.simulation import run_simulation

from fedmed.errors import FederationError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    # Ray's worker machinery leaks /dev/null handles that the GC reports as ResourceWarning
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture
def ray_env(tmp_path, short_ray_tmpdir, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(short_ray_tmpdir))
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    return tmp_path


def _simulate(settings: RunSettings, folders: tuple[str, ...]) -> None:
    run_simulation(
        server_app=make_server_app(settings),
        client_app=make_client_app(resolve_site=PartitionSites(folders)),
        num_supernodes=len(folders),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )


def _settings(out, **changes) -> RunSettings:
    base = {
        "num_rounds": 1,
        "model_features": "4,8,16,32,64",
        "patch_size": "32,32",
        "local_steps": 1,
        "batch_size": 2,
        "out_dir": str(out),
        "join_timeout": 3.0,
        "round_timeout": 120.0,
    }
    return RunSettings(**{**base, **changes})


def test_too_few_sites_is_a_clear_error_not_a_hang(ray_env, demo_root):
    settings = _settings(ray_env / "out", min_sites=3)
    with pytest.raises(FederationError, match="only 2 of min-sites 3 sites connected"):
        _simulate(settings, (str(demo_root / "site-A"), str(demo_root / "site-B")))


def test_failing_sites_fail_the_round_retry_it_then_stop(ray_env, demo_root):
    # Prepare: site-B's folder does not exist, so every one of its replies is an error
    missing = ray_env / "private-site-B-folder"
    settings = _settings(ray_env / "out", min_sites=2, retry_failed_rounds=1)
    # Execute
    with pytest.raises(FederationError, match="round 1 had fewer than min-sites 2 valid"):
        _simulate(settings, (str(demo_root / "site-A"), str(missing)))
    # Assert: two failed attempts logged, each with site-B's error and no path in it
    records = MetricsLog(settings.out_dir).read()
    failed = [r for r in records if r["status"] == "failed"]
    assert [r["attempt"] for r in failed] == [1, 2]
    for record in failed:
        assert set(record["sites"]) == {"site-A"}
        # site-B could not answer the roster query either, so it is known by its node id
        ((name, reason),) = record["rejected"].items()
        assert name.startswith("node-")
        assert reason.endswith(
            "DataError at site private-site-B-folder; details are in the site's log"
        )
        assert str(ray_env) not in reason
    assert (settings.out_path / "report.md").read_text().count("| failed |") == 2
