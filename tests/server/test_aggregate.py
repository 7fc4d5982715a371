"""Every aggregation rule against an independent reference (np.average, scipy, hand-written)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from fedmed.server.aggregate import (
    Aggregator,
    ServerOptimizer,
    SiteUpdate,
    coordinate_median,
    trimmed_mean,
    weighted_average,
)
from scipy import stats

from fedmed.runsettings.settings import RunSettings


@pytest.fixture
def updates():
    rng = np.random.default_rng(0)
    out = []
    for site, n in zip("ABCDE", [10, 30, 5, 50, 7], strict=True):
        arrays = {
            "conv.weight": rng.normal(size=(4, 3, 3)).astype(np.float32),
            "conv.bias": rng.normal(size=(4,)).astype(np.float32),
            "bn.num_batches_tracked": np.array(n, np.int64),
        }
        out.append(SiteUpdate(site, arrays, n, {"val-dice": 0.5}))
    return out


def test_weighted_average_matches_np_average(updates):
    # Execute
    result = weighted_average([u.arrays for u in updates], [u.num_examples for u in updates])
    # Assert
    weights = [u.num_examples for u in updates]
    for key in ("conv.weight", "conv.bias"):
        ref = np.average(np.stack([u.arrays[key] for u in updates]), axis=0, weights=weights)
        np.testing.assert_allclose(result[key], ref, rtol=1e-6)
        assert result[key].dtype == np.float32
    assert result["bn.num_batches_tracked"].dtype == np.int64


def test_median_matches_np_median(updates):
    result = coordinate_median([u.arrays for u in updates])
    ref = np.median(np.stack([u.arrays["conv.weight"] for u in updates]), axis=0)
    np.testing.assert_allclose(result["conv.weight"], ref, rtol=1e-6)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.4], ids=["none", "one-each-end", "two"])
def test_trimmed_mean_matches_scipy(updates, fraction):
    result = trimmed_mean([u.arrays for u in updates], trim_fraction=fraction)
    stacked = np.stack([u.arrays["conv.bias"] for u in updates]).astype(np.float64)
    ref = stats.trim_mean(stacked, fraction, axis=0)
    np.testing.assert_allclose(result["conv.bias"], ref, rtol=1e-6)


def test_trimmed_mean_ignores_one_outlier():
    arrays = [{"w": np.array([v])} for v in (1.0, 2.0, 3.0, 4.0, 1e9)]
    assert trimmed_mean(arrays, trim_fraction=0.2)["w"][0] == pytest.approx(3.0)


def test_weighted_average_refuses_bad_weights(updates):
    with pytest.raises(ValueError, match="one finite non-negative value per update"):
        weighted_average([u.arrays for u in updates], [1.0])


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_aggregate_identically(updates, strategy):
    current = {k: np.zeros_like(v) for k, v in updates[0].arrays.items()}
    result = Aggregator(RunSettings(strategy=strategy, proximal_mu=0.1)).aggregate(current, updates)
    ref = weighted_average([u.arrays for u in updates], [u.num_examples for u in updates])
    np.testing.assert_array_equal(result["conv.weight"], ref["conv.weight"])


def _adam_reference(x, deltas, *, lr, b1, b2, tau, yogi):
    m = v = 0.0
    for t, d in enumerate(deltas, start=1):
        m = b1 * m + (1 - b1) * d
        if yogi:
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
            eta = lr
        else:
            v = b2 * v + (1 - b2) * d * d
            eta = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        x = x + eta * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_server_optimizer_matches_scalar_reference(kind):
    # Prepare: the sites always average to 1.0, the server starts at 0.0
    opt = ServerOptimizer(kind=kind, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    current = {"w": np.array([0.0])}
    xs, deltas = [0.0], []
    # Execute
    for _ in range(3):
        deltas.append(1.0 - current["w"][0])
        current = opt.step(current, {"w": np.array([1.0])})
        xs.append(current["w"][0])
    # Assert: recompute with the scalar recurrence, feeding the same deltas
    ref = 0.0
    for i in range(3):
        ref = _adam_reference(
            0.0, deltas[: i + 1], lr=0.1, b1=0.9, b2=0.99, tau=1e-3, yogi=kind == "fedyogi"
        )
        assert xs[i + 1] == pytest.approx(ref)


def test_server_optimizer_state_round_trips():
    opt = ServerOptimizer(kind="fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    cur = {"w": np.zeros(3, np.float32)}
    cur = opt.step(cur, {"w": np.ones(3, np.float32)})
    clone = ServerOptimizer(kind="fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    clone.load_state_arrays(opt.state_arrays())
    target = {"w": np.full(3, 2.0, np.float32)}
    np.testing.assert_array_equal(opt.step(cur, target)["w"], clone.step(cur, target)["w"])


def test_weights_that_overflow_their_sum_are_refused(updates):
    # two sites claiming 1.7e308 each: today the sum overflowed and zeroed the model
    with pytest.raises(ValueError, match="not a positive finite number"):
        weighted_average([u.arrays for u in updates[:2]], [1.7e308, 1.7e308])


def test_scaffold_moves_the_server_control_by_the_mean_change_over_all_sites():
    # Prepare: 4 sites in the federation, 2 sent control changes this round
    controls = {"w": np.zeros(3, np.float32)}
    agg = Aggregator(RunSettings(strategy="scaffold"), controls=controls)
    ups = [
        SiteUpdate("A", {"w": np.ones(3)}, 1, {}, {"w": np.full(3, 2.0, np.float32)}),
        SiteUpdate("B", {"w": np.ones(3)}, 1, {}, {"w": np.full(3, 6.0, np.float32)}),
    ]
    # Execute
    agg.update_control(ups, num_sites=4)
    # Assert: c += (2 + 6) / 4, and it survives a checkpoint round trip
    assert np.allclose(agg.control["w"], 2.0)
    restored = Aggregator(RunSettings(strategy="scaffold"), controls=controls)
    restored.load_state_arrays(agg.state_arrays())
    assert np.allclose(restored.control["w"], 2.0)


def test_a_trimmed_mean_that_trims_nothing_warns_once(caplog):
    aggregator = Aggregator(RunSettings(strategy="trimmed-mean", trim_fraction=0.2))
    current = {"w": np.zeros(1, dtype=np.float32)}
    three = [
        SiteUpdate(s, {"w": np.full(1, v, np.float32)}, 1, {})
        for s, v in zip("ABC", (1, 2, 9), strict=True)
    ]
    with caplog.at_level(logging.WARNING, logger="fedmed.server.aggregate"):
        merged = aggregator.aggregate(current, three)
        aggregator.aggregate(current, three)
    # int(0.2 x 3) = 0: a plain mean, said once, with the fix
    assert merged["w"][0] == pytest.approx(4.0)
    assert caplog.text.count("trims nothing at 3 sites") == 1
    assert "raise trim-fraction to at least 0.333" in caplog.text
    caplog.clear()
    five = three + [SiteUpdate(s, {"w": np.full(1, 3, np.float32)}, 1, {}) for s in "DE"]
    with caplog.at_level(logging.WARNING, logger="fedmed.server.aggregate"):
        aggregator.aggregate(current, five)
    assert "trims nothing" not in caplog.text
