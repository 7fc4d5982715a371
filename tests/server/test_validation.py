"""Reply validation: every kind of bad reply is refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from fedmed.server.validation import (
    InvalidReply,
    check_reply,
    default_update_bound,
    model_norm,
    update_norm,
)


@pytest.fixture
def sent():
    return {
        "conv.weight": np.zeros((2, 3), np.float32),
        "bn.num_batches_tracked": np.array(5, np.int64),
    }


def _reply(sent, **changes):
    arrays = {k: v.copy() for k, v in sent.items()}
    arrays.update(changes)
    return arrays


def test_matching_reply_passes_and_returns_num_examples(sent):
    arrays = _reply(sent, **{"conv.weight": np.full((2, 3), 0.1, np.float32)})
    assert check_reply(arrays, {"num-examples": 12.0}, sent, max_update_norm=1.0) == 12.0


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"conv.weight": np.zeros((3, 2), np.float32)}, r"'conv.weight' has shape \(3, 2\)"),
        ({"conv.weight": np.zeros((2, 3), np.float64)}, "'conv.weight' has dtype float64"),
        ({"conv.weight": np.full((2, 3), np.nan, np.float32)}, "NaN or infinite"),
        ({"extra": np.zeros(1, np.float32)}, "unexpected 'extra'"),
        ({"conv.weight": np.full((2, 3), 10.0, np.float32)}, "update norm 24.49 exceeds the"),
    ],
    ids=["shape", "dtype", "nan", "extra-key", "norm"],
)
def test_bad_arrays_are_refused(sent, changes, match):
    with pytest.raises(InvalidReply, match=match):
        check_reply(_reply(sent, **changes), {"num-examples": 3}, sent, max_update_norm=5.0)


def test_missing_key_is_refused(sent):
    arrays = {"conv.weight": sent["conv.weight"]}
    with pytest.raises(InvalidReply, match=r"missing 'bn\.num_batches_tracked'"):
        check_reply(arrays, {"num-examples": 3}, sent, max_update_norm=0.0)


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ({}, "lack 'num-examples'"),
        ({"num-examples": 4, "train-loss": [1.0, float("nan")]}, "'train-loss' is not finite"),
        ({"num-examples": 0}, "positive whole number, got 0"),
        ({"num-examples": 2.5}, "positive whole number, got 2.5"),
        ({"num-examples": 4, "train-loss": float("inf")}, "'train-loss' is not finite"),
    ],
    ids=["missing", "nan-in-list", "zero", "fraction", "inf-loss"],
)
def test_bad_metrics_are_refused(sent, metrics, match):
    with pytest.raises(InvalidReply, match=match):
        check_reply(_reply(sent), metrics, sent, max_update_norm=0.0)


def test_zero_bound_means_no_norm_check(sent):
    arrays = _reply(sent, **{"conv.weight": np.full((2, 3), 1e6, np.float32)})
    assert check_reply(arrays, {"num-examples": 1}, sent, max_update_norm=0.0) == 1.0


def test_update_norm_ignores_integer_buffers(sent):
    arrays = _reply(sent, **{"bn.num_batches_tracked": np.array(500, np.int64)})
    arrays["conv.weight"] = np.full((2, 3), 1.0, np.float32)
    assert update_norm(arrays, sent) == pytest.approx(np.sqrt(6.0))


def test_a_weight_above_what_the_site_announced_is_refused(sent):
    with pytest.raises(InvalidReply, match="claims 13 but the site announced 12"):
        check_reply(_reply(sent), {"num-examples": 13}, sent, max_update_norm=0.0, max_weight=12)


def test_fractional_weights_pass_only_where_volumes_are_counted(sent):
    metrics = {"num-examples": 2.5e6}
    assert (
        check_reply(_reply(sent), metrics, sent, max_update_norm=0.0, whole_weight=False) == 2.5e6
    )
    with pytest.raises(InvalidReply, match="positive whole number"):
        check_reply(_reply(sent), {"num-examples": 2.5}, sent, max_update_norm=0.0)


def test_negative_variances_are_refused():
    sent = {"bn.running_var": np.ones(2, np.float32)}
    arrays = {"bn.running_var": np.array([1.0, -0.5], np.float32)}
    with pytest.raises(InvalidReply, match="negative variances"):
        check_reply(arrays, {"num-examples": 1}, sent, max_update_norm=0.0)


def test_the_bound_covers_the_parameters_named_not_the_statistics():
    sent = {"w": np.zeros(4, np.float32), "bn.running_mean": np.zeros(4, np.float32)}
    arrays = {"w": np.full(4, 0.5, np.float32), "bn.running_mean": np.full(4, 100.0, np.float32)}
    assert update_norm(arrays, sent, keys={"w"}) == pytest.approx(1.0)
    # statistics moving far (data, not learned) do not trip a bound on the parameters
    check_reply(arrays, {"num-examples": 1}, sent, max_update_norm=1.5, norm_keys={"w"})
    with pytest.raises(InvalidReply, match="exceeds the update bound"):
        check_reply(arrays, {"num-examples": 1}, sent, max_update_norm=1.5)


def test_default_bound_is_twice_the_model_plus_the_dp_noise():
    sent = {"w": np.full(4, 3.0, np.float32), "n": np.array(7, np.int64)}
    assert model_norm(sent) == pytest.approx(6.0)
    assert default_update_bound(sent) == pytest.approx(12.0)
    assert default_update_bound(sent, dp_noise_norm=10.0) == pytest.approx(42.0)
    # a model near zero still allows an update of length 2
    assert default_update_bound({"w": np.zeros(3, np.float32)}) == pytest.approx(2.0)
    # an update that replaces the model with one of the same size is beyond it
    replaced = {"w": np.full(4, -3.0, np.float32), "n": np.array(7, np.int64)}
    assert update_norm(replaced, sent) == pytest.approx(12.0)
