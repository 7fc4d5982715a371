"""RunSettings: defaults, parsing of run_config, and errors that name the key."""

from __future__ import annotations

import pytest
from fedmed.server.federation import train_config

from fedmed.errors import ConfigError
from fedmed.runsettings.settings import RunSettings


def test_empty_run_config_gives_defaults():
    settings = RunSettings.from_run_config({})
    assert settings == RunSettings()
    assert settings.strategy == "fedavg"
    assert settings.patch_shape == (96, 96)


def test_run_config_round_trips_through_to_run_config():
    settings = RunSettings(strategy="fedadam", model="unet3d", patch_size="32,32,16", seed=7)
    assert RunSettings.from_run_config(settings.to_run_config()) == settings


def test_kebab_keys_parse_and_ints_become_floats():
    settings = RunSettings.from_run_config(
        {"num-rounds": 4, "proximal-mu": 1, "strategy": "fedprox", "model-features": "8,16"}
    )
    assert settings.num_rounds == 4
    assert settings.proximal_mu == 1.0 and isinstance(settings.proximal_mu, float)
    assert settings.features == (8, 16)


@pytest.mark.parametrize(
    ("run_config", "match"),
    [
        ({"num-round": 3}, "'num-round' is not a fedmed setting"),
        ({"num-rounds": 0}, "'num-rounds' is 0: it must be >= 1"),
        ({"num-rounds": "3"}, "'num-rounds' is '3' .*TOML int"),
        ({"fedbn": 1}, "'fedbn' is 1 .*TOML bool"),
        ({"strategy": "krum"}, "'strategy' is 'krum': use one of fedavg"),
        ({"model": "vnet"}, "'model' is 'vnet'"),
        ({"trim-fraction": 0.5}, "'trim-fraction' is 0.5: it must be < 0.5"),
        ({"lr": 0.0}, "'lr' is 0.0: it must be > 0"),
        ({"patch-size": "64,64"}, "'patch-size' .*needs 3 sizes"),
        ({"model-features": "8,x"}, "'model-features' is '8,x'"),
        ({"round-timeout": float("nan")}, "'round-timeout' is nan"),
        ({"patch-size": "40,40"}, "needs multiples of 16"),
    ],
    ids=[
        "typo",
        "zero-rounds",
        "string-int",
        "int-bool",
        "strategy",
        "model",
        "trim",
        "lr",
        "patch-dims",
        "features",
        "nan",
        "patch-divisor",
    ],
)
def test_invalid_run_config_names_the_key(run_config, match):
    if run_config.get("patch-size") == "64,64":
        run_config = {**run_config, "model": "unet3d"}
    with pytest.raises(ConfigError, match=match):
        RunSettings.from_run_config(run_config)


def test_proximal_mu_means_the_same_with_every_strategy():
    # fedprox is FedAvg with mu 0.01 unless set; a mu > 0 adds the term with any strategy
    assert RunSettings(strategy="fedprox").effective_proximal_mu == 0.01
    assert RunSettings(strategy="fedprox", proximal_mu=0.5).effective_proximal_mu == 0.5
    assert RunSettings(strategy="fedavg", proximal_mu=0.5).effective_proximal_mu == 0.5
    assert RunSettings(strategy="fedavg").effective_proximal_mu == 0.0
    sent = train_config(RunSettings(strategy="fedprox"), 1)
    assert sent.proximal_mu == 0.01


def test_identity_hash_ignores_round_count_but_not_lr():
    base = RunSettings()
    assert base.identity_hash() == RunSettings(num_rounds=50, round_timeout=5).identity_hash()
    assert base.identity_hash() != RunSettings(lr=0.5).identity_hash()


@pytest.mark.parametrize(
    ("run_config", "match"),
    [
        ({"min-sites": 2}, "min-sites is 2: SecAgg\\+ needs at least 3 sites"),
        ({"min-sites": 3, "strategy": "fedmedian"}, "'fedmedian', which needs each site's"),
        ({"min-sites": 3, "max-update-norm": 5.0}, "'max-update-norm' needs each site's update"),
    ],
    ids=["two-sites", "median", "norm-bound"],
)
def test_secure_aggregation_refuses_what_needs_single_updates(run_config, match):
    with pytest.raises(ConfigError, match=match):
        RunSettings.from_run_config({"secure-aggregation": True, **run_config})


def test_secure_aggregation_with_three_sites_and_fedprox_is_accepted():
    settings = RunSettings.from_run_config(
        {"secure-aggregation": True, "min-sites": 3, "strategy": "fedprox", "proximal-mu": 0.01}
    )
    assert settings.secure_aggregation and settings.secagg_clip_range == 8.0


def test_secagg_keys_count_for_resume_only_when_secure_aggregation_is_on():
    plain = RunSettings(min_sites=3)
    assert RunSettings(min_sites=3, secagg_clip_range=4.0).identity_hash() == plain.identity_hash()
    secure = RunSettings(min_sites=3, secure_aggregation=True)
    assert secure.identity_hash() != plain.identity_hash()
    assert (
        RunSettings(min_sites=3, secure_aggregation=True, secagg_clip_range=4.0).identity_hash()
        != secure.identity_hash()
    )


def test_cosine_schedule_anneals_the_rounds_and_leaves_the_rest_at_lr():
    settings = RunSettings(num_rounds=4, lr=0.01, lr_schedule="cosine")
    rounds = [settings.round_lr(r) for r in (1, 2, 3, 4)]
    assert rounds == pytest.approx([0.01, 0.0085355, 0.005, 0.0014645], rel=1e-4)
    # round 0 (the initial model) and the end-of-run training after the last round
    assert settings.round_lr(0) == settings.round_lr(5) == 0.01
    constant = RunSettings(num_rounds=4, lr=0.01)
    assert [constant.round_lr(r) for r in range(6)] == [0.01] * 6


def test_unknown_lr_schedule_is_refused():
    with pytest.raises(ConfigError, match="'lr-schedule' is 'step': use one of constant, cosine"):
        RunSettings.from_run_config({"lr-schedule": "step"})


def test_lr_schedule_keeps_old_hashes_and_makes_the_round_count_part_of_the_run():
    # constant (the default) keeps the hash runs had before the key existed, and num-rounds
    # stays resumable; under cosine the round count shapes every round's lr, so it counts
    base = RunSettings()
    cosine = RunSettings(lr_schedule="cosine")
    assert cosine.identity_hash() != base.identity_hash()
    assert RunSettings(num_rounds=9).identity_hash() == base.identity_hash()
    assert RunSettings(lr_schedule="cosine", num_rounds=9).identity_hash() != cosine.identity_hash()
