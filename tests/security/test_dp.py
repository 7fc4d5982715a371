"""Site-level DP and the DP settings: clipping bounds the update, noise has the configured scale
(a share of it per site under SecAgg+), epsilon agrees with Google's dp_accounting under both
adjacencies, modes parse as documented, and only public metrics leave a DP site."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from fedmed.errors import ConfigError
from fedmed.security.accountant import aggregate_noise_multiplier, gaussian_epsilon
from fedmed.security.dp import (
    DpParams,
    clip_update,
    expected_noise_norm,
    privatize,
    reduce_metrics,
    update_norm,
)
from fedmed.security.secagg import flatten_records, split_records


def _arrays(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a.weight": (scale * rng.normal(size=(8, 4))).astype(np.float32),
        "a.bias": (scale * rng.normal(size=8)).astype(np.float32),
        "bn.num_batches_tracked": np.array(5, dtype=np.int64),
    }


def _rdp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("clip", [0.1, 1.0, 100.0], ids=["tight", "unit", "loose"])
def test_clipping_bounds_the_update_norm(clip: float) -> None:
    received, trained = _arrays(0), _arrays(1, scale=3.0)

    sent, metrics = privatize(trained, received, DpParams(clip_norm=clip))
    update = {k: sent[k].astype(np.float64) - received[k] for k in ("a.weight", "a.bias")}

    raw = update_norm({k: trained[k].astype(np.float64) - received[k] for k in update})
    assert metrics["dp-update-norm"] == pytest.approx(raw)
    assert update_norm(update) <= clip * (1 + 1e-5)
    assert update_norm(update) == pytest.approx(min(clip, raw), rel=1e-5)
    assert metrics["dp-clipped"] == float(raw > clip)
    assert sent["bn.num_batches_tracked"] == trained["bn.num_batches_tracked"]
    assert sent["a.weight"].dtype == np.float32


def test_clip_update_keeps_small_updates_and_direction() -> None:
    update = {"w": np.array([3.0, 4.0])}

    small, norm = clip_update(update, 10.0)
    clipped, _ = clip_update(update, 1.0)

    assert norm == 5.0
    np.testing.assert_allclose(small["w"], [3.0, 4.0])
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8])


def test_noise_has_std_noise_multiplier_times_clip_norm() -> None:
    received = {"w": np.zeros(200_000, np.float32)}
    params = DpParams(clip_norm=0.5, noise_multiplier=2.0)

    sent, _ = privatize(received, received, params, rng=np.random.default_rng(3))

    assert float(np.std(sent["w"])) == pytest.approx(1.0, rel=0.01)
    assert abs(float(np.mean(sent["w"]))) < 0.01


def test_distributed_noise_sums_to_sigma_c_over_the_secure_sites() -> None:
    # Prepare: 5 sites in a SecAgg+ round, each adds its share; 400 draws of the aggregate of
    # one coordinate (the statistic the guarantee is about), plus a wide vector for the share
    sigma, clip, sites = 1.1, 0.5, 5
    params = DpParams(clip_norm=clip, noise_multiplier=sigma).secure(sites)
    received = {"w": np.zeros(1, np.float64)}
    rng = np.random.default_rng(7)

    # Execute
    sums = [
        sum(float(privatize(received, received, params, rng=rng)[0]["w"][0]) for _ in range(sites))
        for _ in range(400)
    ]
    share = privatize({"w": np.zeros(100_000)}, {"w": np.zeros(100_000)}, params, rng=rng)[0]

    # Assert
    assert float(np.std(sums)) == pytest.approx(sigma * clip, rel=0.10)
    assert float(np.std(share["w"])) == pytest.approx(sigma * clip / math.sqrt(sites), rel=0.01)
    assert params.noise_std == pytest.approx(sigma * clip / math.sqrt(sites))


def test_secure_round_privacy_record_survives_the_secagg_config_flattening() -> None:
    params = DpParams(clip_norm=1.0, noise_multiplier=1.1).secure(5, min_sites=4)

    flat = flatten_records({"round": 1}, {}, {"privacy": params.to_record()})
    _, _, records = split_records(flat)

    assert DpParams.from_record(records["privacy"]) == params
    assert DpParams.from_record(records["privacy"]).noise_std == pytest.approx(1.1 / 2)


def test_noise_for_the_fewest_survivors_keeps_sigma_when_sites_drop() -> None:
    full = DpParams(clip_norm=1.0, noise_multiplier=1.0).secure(5)
    robust = DpParams(clip_norm=1.0, noise_multiplier=1.0).secure(5, min_sites=4)

    # 4 of 5 shares arrive: full noise only if each share was sized for 4
    assert math.sqrt(4) * full.noise_std == pytest.approx(math.sqrt(4 / 5))
    assert math.sqrt(4) * robust.noise_std == pytest.approx(1.0)
    assert aggregate_noise_multiplier(1.0, noised_for=5, survivors=4) == pytest.approx(
        math.sqrt(4 / 5)
    )


@pytest.mark.parametrize(
    ("adjacency", "figure"),
    [("add-remove", 16.9), ("replace-one", 42.6)],
    ids=["add-remove", "replace-one"],
)
def test_issue_figures_sigma_1_1_ten_rounds(adjacency: str, figure: float) -> None:
    # add-remove: sensitivity C, multiplier sigma; replace-one: sensitivity 2C, sigma / 2
    reference = _rdp_epsilon(1.1 if adjacency == "add-remove" else 0.55, 10, 1e-5)

    params = DpParams(clip_norm=1.0, noise_multiplier=1.1, adjacency=adjacency)

    assert round(reference, 1) == figure
    assert params.epsilon(10) == pytest.approx(reference, rel=1e-9)


def test_epsilon_grows_with_rounds_as_the_accountant_says() -> None:
    params = DpParams(clip_norm=1.0, noise_multiplier=1.1, adjacency="add-remove")

    ours = [params.epsilon(r) for r in range(1, 11)]

    assert ours == pytest.approx([_rdp_epsilon(1.1, r, 1e-5) for r in range(1, 11)], rel=1e-9)
    assert ours == sorted(ours)


def test_epsilon_matches_values_flower_reported() -> None:
    # FLOWER.md: Flower's RdpAccountant, noise multiplier 1, delta 1e-5, no amplification.
    eps = [
        gaussian_epsilon(noise_multiplier=1.0, rounds=r, delta=1e-5, adjacency="add-remove")
        for r in (1, 2, 3)
    ]

    assert [round(e, 2) for e in eps] == [4.73, 7.08, 9.01]


def test_without_noise_epsilon_is_infinite_and_before_training_zero() -> None:
    assert DpParams(clip_norm=1.0).epsilon(1) == math.inf
    assert DpParams(clip_norm=1.0, noise_multiplier=1.0).epsilon(0) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "mode", "adjacency"),
    [
        ({}, "off", "replace-one"),
        ({"clip_norm": 0.5}, "site", "replace-one"),
        ({"clip_norm": 0.5, "adjacency": "add-remove"}, "site", "add-remove"),
        ({"mode": "record", "clip_norm": 1.0, "noise_multiplier": 1.0}, "record", "add-remove"),
        ({"mode": "site", "clip_norm": 1.0}, "site", "replace-one"),
    ],
    ids=["nothing", "clip-means-site", "site-add-remove", "record", "explicit-site"],
)
def test_mode_and_adjacency_resolve_as_documented(kwargs, mode, adjacency) -> None:
    params = DpParams(**kwargs)

    assert (params.mode, params.adjacency) == (mode, adjacency)
    assert params.enabled == (mode != "off")


def test_record_round_trip_and_off_by_default() -> None:
    params = DpParams(clip_norm=0.5, noise_multiplier=1.2, delta=1e-6, max_epsilon=8.0)
    record = DpParams(mode="record", clip_norm=1.0, noise_multiplier=0.8, patients_per_step=16)
    secure = DpParams(clip_norm=1.0, noise_multiplier=1.0).secure(6, min_sites=4)

    assert DpParams.from_record(params.to_record()) == params
    assert DpParams.from_record(record.to_record()) == record
    assert DpParams.from_record(secure.to_record()) == secure
    assert not DpParams.from_record(None).enabled


def test_record_of_an_older_server_without_mode_means_site_level() -> None:
    old = {"dp-clip-norm": 1.0, "dp-noise-multiplier": 1.0, "dp-delta": 1e-5}

    assert DpParams.from_record(old).mode == "site"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_norm": -1.0}, "dp-clip-norm"),
        ({"clip_norm": 1.0, "delta": 1.0}, "dp-delta"),
        ({"noise_multiplier": 1.0}, "'dp-noise-multiplier' is 1 but DP is off"),
        ({"mode": "central", "clip_norm": 1.0}, "'dp-mode' is 'central'"),
        ({"mode": "off", "clip_norm": 1.0}, "'dp-clip-norm' is 1 but DP is off"),
        ({"max_epsilon": 8.0}, "'dp-max-epsilon' is 8 but DP is off"),
        ({"mode": "site"}, "'dp-clip-norm' is 0: set the L2 bound on a site's update"),
        ({"mode": "record", "noise_multiplier": 1.0}, "L2 bound on one patient's gradient"),
        ({"mode": "record", "clip_norm": 1.0}, "DP-SGD without noise protects nobody"),
        (
            {
                "mode": "record",
                "clip_norm": 1.0,
                "noise_multiplier": 1.0,
                "adjacency": "replace-one",
            },
            "no replace-one accountant for Poisson sampling",
        ),
        ({"clip_norm": 1.0, "adjacency": "swap"}, "'dp-adjacency' is 'swap'"),
        ({"clip_norm": 1.0, "patients_per_step": 0.0}, "dp-patients-per-step"),
        (
            {"mode": "record", "clip_norm": 1.0, "noise_multiplier": 1.0, "secure_sites": 3},
            "distributed noise only in dp-mode 'site'",
        ),
    ],
    ids=[
        "negative-clip",
        "delta-one",
        "noise-without-clip",
        "unknown-mode",
        "off-with-clip",
        "budget-without-dp",
        "site-without-clip",
        "record-without-clip",
        "record-without-noise",
        "record-replace-one",
        "unknown-adjacency",
        "no-patients",
        "record-secure",
    ],
)
def test_invalid_settings_are_refused(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        DpParams(**kwargs)


def test_privatize_refuses_record_mode() -> None:
    params = DpParams(mode="record", clip_norm=1.0, noise_multiplier=1.0)

    with pytest.raises(ValueError, match="privatize is site-level DP"):
        privatize(_arrays(0), _arrays(0), params)
    with pytest.raises(ValueError, match="epsilon is site-level"):
        params.epsilon(1)


METRICS = {
    "num-examples": 812.0,
    "num-steps": 50.0,
    "train-loss": 0.41,
    "val-dice": 0.62,
    "val-hd95": 7.5,
    "train-seconds": 12.3,
    "dp-epsilon": 1.5,
    "dp-steps": 50.0,
}


def test_dp_metrics_keep_only_public_values() -> None:
    site = DpParams(clip_norm=1.0, noise_multiplier=1.0)

    kept = reduce_metrics(METRICS, site, num_train_cases=20)
    secure = reduce_metrics(METRICS, site.secure(4), num_train_cases=20)

    assert kept == {"num-examples": 20.0, "num-steps": 50.0, "dp-epsilon": 1.5, "dp-steps": 50.0}
    assert secure["num-examples"] == 1.0  # equal weights: the noise shares add up evenly
    assert reduce_metrics(METRICS, DpParams(), num_train_cases=20) == METRICS


def test_expected_noise_norm_is_sigma_c_sqrt_d_and_matches_a_draw() -> None:
    d, sigma, clip = 40_000, 1.1, 0.5
    draw = np.random.default_rng(0).normal(0.0, sigma * clip, d)

    expected = expected_noise_norm(d, sigma, clip)

    assert expected == pytest.approx(sigma * clip * math.sqrt(d))
    assert float(np.linalg.norm(draw)) == pytest.approx(expected, rel=0.02)
    # the issue's COPLE-Net figure: about 3,600 against a clipped signal of at most 1
    assert round(expected_noise_norm(10_521_666, 1.1, 1.0), -2) == 3600
    assert expected_noise_norm(d, sigma, clip, steps=4, lr=0.1, expected_batch=8) == (
        pytest.approx(0.1 * sigma * clip * math.sqrt(4 * d) / 8)
    )
