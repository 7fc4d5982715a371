"""The simulation SuperLink's apps: run_config split, partition -> folder, the FAB they ship in."""

from __future__ import annotations

import io
import zipfile

import pytest
import tomllib
from fedmed.simulation.apps import (
    SIM_KEYS,
    RunConfigSites,
    sim_run_config,
    split_run_config,
)
from fedmed.simulation.engine import simulation_fab
from flwr.app import Context, RecordDict

from fedmed.errors import ConfigError
from fedmed.runsettings.settings import RunSettings


def _context(partition: int, run_config: dict) -> Context:
    return Context(
        run_id=1,
        node_id=99,
        node_config={"partition-id": partition, "num-partitions": 2},
        state=RecordDict(),
        run_config=run_config,
    )


def test_split_keeps_sim_keys_away_from_the_run_settings():
    run_config = {
        **RunSettings(num_rounds=4).to_run_config(),
        **sim_run_config(["/d/a", "/d/b"], cache_mode="none", device="cpu", threads=1),
    }
    sim, app = split_run_config(run_config)
    assert set(sim) == set(SIM_KEYS)
    assert RunSettings.from_run_config(app).num_rounds == 4
    with pytest.raises(ConfigError, match="'sim-sites' is not a fedmed setting"):
        RunSettings.from_run_config(run_config)


def test_partition_id_picks_the_folder_and_names_the_site():
    run_config = sim_run_config(
        ["/d/site-A", "/d/site-B"], cache_mode="none", device="cpu", threads=1
    )
    site = RunConfigSites()(_context(1, run_config))
    assert (site.name, site.data_dir, site.cache_mode, site.device) == (
        "site-B",
        "/d/site-B",
        "none",
        "cpu",
    )
    with pytest.raises(ConfigError, match="partition 2 has no site folder"):
        RunConfigSites()(_context(2, run_config))


@pytest.mark.parametrize(
    ("value", "match"),
    [("not json", "not a JSON list"), ('{"a": 1}', "must list folder names")],
)
def test_bad_site_list_is_a_config_error(value, match):
    with pytest.raises(ConfigError, match=match):
        RunConfigSites()(_context(0, {"sim-sites": value}))


def test_fab_declares_every_key_and_points_at_the_simulation_apps():
    fab = simulation_fab()
    with zipfile.ZipFile(io.BytesIO(fab.content)) as archive:
        pyproject = tomllib.loads(archive.read("pyproject.toml").decode())
        server = archive.read("fedmed_app/server_app.py").decode()
        client = archive.read("fedmed_app/client_app.py").decode()
    config = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(config) == set(RunSettings().to_run_config()) | set(SIM_KEYS)
    assert "from fedmed.simulation.apps import server_app as app" in server
    assert "from fedmed.simulation.apps import client_app as app" in client
    assert simulation_fab().hash_str == fab.hash_str


def test_run_timeout_covers_every_stage_of_a_secure_round() -> None:
    base = {"num_rounds": 2, "min_sites": 3, "join_timeout": 5.0, "round_timeout": 10.0}
    plain = RunSettings(**base, retry_failed_rounds=1, cross_site_evaluation=False)
    secure = RunSettings(
        **base, retry_failed_rounds=1, secure_aggregation=True, cross_site_evaluation=False
    )
    evaluated = RunSettings(**base, retry_failed_rounds=1, evaluation_timeout=30.0)
    # join + rounds x attempts x (join + stages x round-timeout) [+ 2 x evaluation] + start-up
    assert plain.run_deadline == 5 + 2 * 2 * (5 + 1 * 10) + 600
    assert secure.run_deadline == 5 + 2 * 2 * (5 + 4 * 10) + 600
    assert evaluated.run_deadline == 5 + 2 * 2 * (5 + 1 * 10) + 2 * 30 + 600
