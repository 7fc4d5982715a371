"""The round loop's failure paths on Flower's simulation engine: too few sites joined, and
rounds whose replies are errors (failed, retried, then a clear FederationError)."""

from __future__ import annotations

import pytest
from fedmed.client.app import make_client_app
from fedmed.client.runtime import PartitionSites
from fedmed.server.app import make_server_app
from fedmed.server.report import MetricsLog
from flwr.simulation import run_simulation

from fedmed.errors import FederationError
from fedmed.runsettings.settings import RunSettings

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


def test_a_site_that_cannot_say_which_site_it_is_never_trains(ray_env, demo_root, caplog):
    # Prepare: site-B's folder does not exist, so it cannot answer the roster query
    # (failed training attempts and their retries: tests/e2e/test_faults.py)
    missing = ray_env / "private-site-B-folder"
    settings = _settings(ray_env / "out", min_sites=2, retry_failed_rounds=1)
    # Execute
    with pytest.raises(FederationError, match=r"only 1 of min-sites 2 sites connected") as info:
        _simulate(settings, (str(demo_root / "site-A"), str(missing)))
    # Assert: the error counts the node that did not answer, names no path; nothing trained
    assert "(1 more did not say which site they are)" in str(info.value)
    assert str(ray_env) not in str(info.value)
    assert "DataError at site private-site-B-folder; details are in the site's log" in caplog.text
    records = MetricsLog(settings.out_dir).read()
    assert [r for r in records if r.get("round", 0) >= 1] == []
