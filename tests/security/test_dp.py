"""Client-side DP: clipping bounds the update, noise has the configured scale, the RDP
accountant agrees with Google's dp_accounting (which Flower's RdpAccountant wraps)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fedmed.errors import ConfigError
from fedmed.security.dp import DpParams, clip_update, gaussian_epsilon, privatize, update_norm


def _arrays(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a.weight": (scale * rng.normal(size=(8, 4))).astype(np.float32),
        "a.bias": (scale * rng.normal(size=8)).astype(np.float32),
        "bn.num_batches_tracked": np.array(5, dtype=np.int64),
    }


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


def test_epsilon_grows_with_rounds_as_the_accountant_says() -> None:
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import RdpAccountant

    params = DpParams(clip_norm=1.0, noise_multiplier=1.1, delta=1e-5)
    ours = [params.epsilon(r) for r in range(1, 11)]
    for rounds, eps in enumerate(ours, start=1):
        accountant = RdpAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(1.1), rounds)
        assert eps == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert all(b > a for a, b in itertools.pairwise(ours))


def test_epsilon_matches_values_flower_reported() -> None:
    # FLOWER.md: Flower's RdpAccountant, noise multiplier 1, delta 1e-5, no amplification.
    eps = [gaussian_epsilon(noise_multiplier=1.0, rounds=r, delta=1e-5) for r in (1, 2, 3)]

    assert [round(e, 2) for e in eps] == [4.73, 7.08, 9.01]


def test_without_noise_epsilon_is_infinite_and_before_training_zero() -> None:
    assert DpParams(clip_norm=1.0).epsilon(1) == math.inf
    assert DpParams(clip_norm=1.0, noise_multiplier=1.0).epsilon(0) == 0.0


def test_record_round_trip_and_off_by_default() -> None:
    params = DpParams(clip_norm=0.5, noise_multiplier=1.2, delta=1e-6, max_epsilon=8.0)

    assert DpParams.from_record(params.to_record()) == params
    assert not DpParams.from_record(None).enabled


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_norm": -1.0}, "dp-clip-norm"),
        ({"clip_norm": 1.0, "delta": 1.0}, "dp-delta"),
        ({"noise_multiplier": 1.0}, "needs a clipping bound"),
    ],
    ids=["negative-clip", "delta-one", "noise-without-clip"],
)
def test_invalid_settings_are_refused(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        DpParams(**kwargs)
