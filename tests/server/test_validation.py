"""Reply validation: every kind of bad reply is refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from fedmed.server.validation import InvalidReply, check_reply, update_norm


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
    assert check_reply(arrays, {"num-examples": 12.0}, sent, max_update_norm=1.0) == 12


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"conv.weight": np.zeros((3, 2), np.float32)}, r"'conv.weight' has shape \(3, 2\)"),
        ({"conv.weight": np.zeros((2, 3), np.float64)}, "'conv.weight' has dtype float64"),
        ({"conv.weight": np.full((2, 3), np.nan, np.float32)}, "NaN or infinite"),
        ({"extra": np.zeros(1, np.float32)}, "unexpected 'extra'"),
        ({"conv.weight": np.full((2, 3), 10.0, np.float32)}, "update norm 24.49 exceeds"),
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
        ({"num-examples": 0}, "positive whole number, got 0"),
        ({"num-examples": 2.5}, "positive whole number, got 2.5"),
        ({"num-examples": 4, "train-loss": float("inf")}, "'train-loss' is not finite"),
    ],
    ids=["missing", "zero", "fraction", "inf-loss"],
)
def test_bad_metrics_are_refused(sent, metrics, match):
    with pytest.raises(InvalidReply, match=match):
        check_reply(_reply(sent), metrics, sent, max_update_norm=0.0)


def test_zero_bound_means_no_norm_check(sent):
    arrays = _reply(sent, **{"conv.weight": np.full((2, 3), 1e6, np.float32)})
    assert check_reply(arrays, {"num-examples": 1}, sent, max_update_norm=0.0) == 1


def test_update_norm_ignores_integer_buffers(sent):
    arrays = _reply(sent, **{"bn.num_batches_tracked": np.array(500, np.int64)})
    arrays["conv.weight"] = np.full((2, 3), 1.0, np.float32)
    assert update_norm(arrays, sent) == pytest.approx(np.sqrt(6.0))
