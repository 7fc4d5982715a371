from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fedmed.simulation.cli import main, parse_config
from fedmed.simulation.config import DEMO_APP, load_sim_config, run_settings
from fedmed.simulation.console import format_record

from fedmed.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_no_arguments_is_the_demo():
    cfg, verbose = parse_config([])
    assert (cfg.sites, cfg.strategies, cfg.data.source, verbose) == (3, ("fedavg",), "demo", False)
    assert cfg.app == DEMO_APP


def test_shipped_config_equals_the_built_in_defaults():
    assert load_sim_config(REPO / "configs" / "sim.toml") == load_sim_config(None)


def test_flags_override_the_config():
    cfg, _ = parse_config(
        ["--rounds", "2", "--compare", "fedavg,fedprox,fedbn", "--sites", "4", "--seed", "7"]
    )
    assert cfg.app["num-rounds"] == 2 and cfg.sites == 4 and cfg.seed == 7
    assert cfg.strategies == ("fedavg", "fedprox", "fedbn")
    fedbn = run_settings(cfg, "fedbn", out_dir="o", holdout="h")
    assert (fedbn.strategy, fedbn.fedbn, fedbn.min_sites, fedbn.seed) == ("fedavg", True, 4, 7)
    assert run_settings(cfg, "fedprox", out_dir="o", holdout="").proximal_mu == 0.01


def test_sites_per_round_flag_samples_and_lowers_min_sites():
    cfg, _ = parse_config(["--sites", "64", "--sites-per-round", "8"])
    settings = run_settings(cfg, "fedavg", out_dir="o", holdout="")
    assert (settings.sites_per_round, settings.min_sites) == (8, 8)
    every = run_settings(parse_config(["--sites", "5"])[0], "fedavg", out_dir="o", holdout="")
    assert (every.sites_per_round, every.min_sites) == (0, 5)


def test_data_folders_set_the_number_of_sites(tmp_path):
    cfg, _ = parse_config(["--data", "a", "b"])
    assert cfg.sites == 2 and cfg.data.folders == ("a", "b")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--strategy", "fedavg", "--compare", "fedprox"], "--strategy or --compare, not both"),
        (["--compare", "fedavg,fedsgd"], "strategy 'fedsgd' is unknown"),
        (["--compare", "fedavg,fedavg"], "lists a strategy twice"),
        (["--split", "iid"], "--split applies to --pooled data"),
        (["--pooled", "p", "--split", "random"], "data split 'random'"),
        (["--pooled", "p", "--split", "size-skew", "--alpha", "0"], "alpha is 0.0"),
        (["--data", "a", "b", "--sites", "3"], "2 data folders for 3 sites"),
        (["--sites", "0"], "simulate at least 1 site"),
        (["--model", "vit"], "key 'model' is 'vit'"),
        (["--num-gpus", "2"], "num-gpus is 2.0"),
        (["--max-parallel", "0"], "max-parallel is 0"),
        (["--config", "missing.toml"], "config file missing.toml does not exist"),
    ],
    ids=[
        "strategy-and-compare",
        "unknown-strategy",
        "duplicate",
        "split-without-pooled",
        "bad-split",
        "bad-alpha",
        "folders-vs-sites",
        "no-sites",
        "model",
        "gpus",
        "parallel",
        "config",
    ],
)
def test_bad_arguments_are_config_errors(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


def test_data_and_pooled_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--data", "a", "--pooled", "p"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_main_prints_one_line_for_a_config_error(capsys):
    assert main(["--sites", "0"]) == ConfigError.exit_code
    assert capsys.readouterr().err.strip() == (
        "fedmed-sim: error: sites is 0: simulate at least 1 site"
    )


def test_config_file_errors_name_the_key(tmp_path):
    path = tmp_path / "sim.toml"
    path.write_text('[sim]\nsites = "three"\n[data.shift.site-Q]\nhu-offset = 3\n')
    with pytest.raises(ConfigError, match=r"sim.toml: \[sim\] sites = 'three' must be int"):
        load_sim_config(path)
    path.write_text("[resources]\ngpu = 1\n")
    with pytest.raises(
        ConfigError, match=r"sim.toml: \[resources\] has unknown key\(s\) gpu: check the spelling"
    ):
        load_sim_config(path)


def test_shift_for_an_unknown_site_is_refused(tmp_path):
    path = tmp_path / "sim.toml"
    path.write_text("[data.shift.site-Q]\nhu-offset = 3\n")
    cfg = load_sim_config(path)
    with pytest.raises(ConfigError, match=r"\[data.shift.site-Q\]: no such site among 3"):
        cfg.data.shift_by_index(cfg.sites)


def test_round_line_shows_holdout_and_site_dice():
    record = {
        "round": 2,
        "status": "ok",
        "duration-s": 3.25,
        "holdout": {"dice": 0.5},
        "sites": {"site-B": {"val-dice": 0.25}, "site-A": {"val-dice": 0.75}},
    }
    assert format_record("fedavg", record) == (
        "[fedavg] round 2: held-out Dice 0.500 | site val Dice: site-A 0.750, site-B 0.250, 3.2 s"
    )


def test_proximal_mu_from_app_reaches_every_strategy_as_in_a_deployment():
    cfg = dataclasses.replace(load_sim_config(None), app={**DEMO_APP, "proximal-mu": 0.05})
    assert run_settings(cfg, "fedavg", out_dir="o", holdout="").effective_proximal_mu == 0.05
    assert run_settings(cfg, "fedprox", out_dir="o", holdout="").effective_proximal_mu == 0.05
