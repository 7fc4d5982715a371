"""Per-round site sampling (``sites-per-round``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter

import pytest
from fedmed.server.sampling import sample_sites

from fedmed.errors import ConfigError
from fedmed.runsettings.settings import _RESUMABLE_KEYS, RunSettings

NODES = [9000 + 17 * i for i in range(64)]


def test_zero_means_every_connected_site_sorted() -> None:
    settings = RunSettings(min_sites=2)
    assert sample_sites([5, 3, 9], settings, 1) == [3, 5, 9]


def test_samples_the_configured_number_of_distinct_connected_sites() -> None:
    settings = RunSettings(min_sites=2, sites_per_round=8)
    for server_round in range(1, 6):
        picked = sample_sites(NODES, settings, server_round)
        assert len(picked) == 8 == len(set(picked))
        assert set(picked) <= set(NODES)
        assert picked == sorted(picked)


def test_fewer_connected_than_sites_per_round_asks_them_all() -> None:
    settings = RunSettings(min_sites=2, sites_per_round=8)
    assert sample_sites([4, 2, 7], settings, 3) == [2, 4, 7]


def test_same_seed_and_round_same_sample_whatever_the_node_order() -> None:
    settings = RunSettings(min_sites=2, sites_per_round=8, seed=7)
    again = RunSettings(min_sites=2, sites_per_round=8, seed=7, num_rounds=99, out_dir="x")
    assert sample_sites(NODES, settings, 4) == sample_sites(NODES[::-1], again, 4)


def test_rounds_and_seeds_draw_different_samples() -> None:
    settings = RunSettings(min_sites=2, sites_per_round=8, seed=0)
    by_round = {tuple(sample_sites(NODES, settings, r)) for r in range(1, 11)}
    assert len(by_round) == 10
    other = RunSettings(min_sites=2, sites_per_round=8, seed=1)
    assert sample_sites(NODES, settings, 1) != sample_sites(NODES, other, 1)


def test_every_site_gets_its_turn_roughly_uniformly() -> None:
    settings = RunSettings(min_sites=2, sites_per_round=8)
    counts = Counter(n for r in range(1, 401) for n in sample_sites(NODES, settings, r))
    assert set(counts) == set(NODES)
    # expected 400 * 8 / 64 = 50 per site
    assert min(counts.values()) >= 25 and max(counts.values()) <= 80


def test_sites_per_round_below_min_sites_is_refused() -> None:
    with pytest.raises(ConfigError, match="'sites-per-round' is 2 but min-sites is 4"):
        RunSettings(min_sites=4, sites_per_round=2)
    with pytest.raises(ConfigError, match=r"sites-per-round.*must be >= 0"):
        RunSettings.from_run_config({"sites-per-round": -1})


def test_run_config_round_trip_and_identity_hash() -> None:
    settings = RunSettings.from_run_config({"min-sites": 2, "sites-per-round": 8})
    assert settings.sites_per_round == 8
    assert RunSettings.from_run_config(settings.to_run_config()) == settings
    # sampling changes which sites train: not resumable with another value ...
    assert settings.identity_hash() != RunSettings(min_sites=2, sites_per_round=4).identity_hash()
    assert settings.identity_hash() != RunSettings(min_sites=2).identity_hash()


def test_runs_without_sampling_keep_their_pre_existing_identity_hash() -> None:
    # the hash as computed before sites-per-round and the secagg keys existed: older
    # checkpoints stay resumable
    settings = RunSettings(lr=0.002)
    newer = {
        "sites_per_round",
        "secure_aggregation",
        "secagg_clip_range",
        "secagg_max_weight",
        "aggregation_weight",
        "ditto_lambda",
        "dp_mode",
        "dp_adjacency",
        "dp_patients_per_step",
        "model_norm",
        "loss",
        "nr_gamma",
        "nr_denominator",
        "self_ensembling",
        "ema_decay",
        "lamp_skips",
        "target_spacing",
        "intensity",
        "hu_window",
        "lr_schedule",
    }
    keys = {
        f.metadata["key"]: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if f.name not in _RESUMABLE_KEYS and f.name not in newer
    }
    expected = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()
    assert settings.identity_hash() == expected


def test_names_make_the_sample_independent_of_the_node_ids():
    # a restarted simulation gives every site a new random node id: same names, same sites
    settings = RunSettings(min_sites=2, sites_per_round=3, seed=5)
    names = [f"site-{i:02d}" for i in range(12)]
    first = dict(zip(range(100, 112), names, strict=True))
    second = dict(zip([9_000_000 - 7 * i for i in range(12)], names, strict=True))
    for server_round in (1, 2, 3):
        picked = sample_sites(list(first), settings, server_round, names=first)
        again = sample_sites(list(second), settings, server_round, names=second)
        assert len(picked) == 3
        assert sorted(first[n] for n in picked) == sorted(second[n] for n in again)


def test_avoided_sites_are_drawn_only_to_fill_the_sample() -> None:
    settings = RunSettings(min_sites=2, sites_per_round=8, seed=3)
    first = sample_sites(NODES, settings, 5)
    retry = sample_sites(NODES, settings, 5, avoid=first[:3])
    assert len(retry) == 8 and not set(retry) & set(first[:3])
    # only 9 connected and 3 of them failed: the 6 others plus 2 of the failed ones
    nine = NODES[:9]
    picked = sample_sites(nine, settings, 5, avoid=nine[:3])
    assert len(picked) == 8 and set(nine[3:]) <= set(picked)
    # no failures: the same draw as before (a resumed run asks the same sites)
    assert sample_sites(NODES, settings, 5, avoid=()) == first
