"""SecAgg+ message format and quantization bound (the protocol itself runs in the e2e tests)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedmed.security.secagg import (
    QUANTIZATION_RANGE,
    flatten_records,
    quantization_tolerance,
    split_records,
)


def test_records_round_trip_through_one_legacy_config() -> None:
    config = {"server-round": 3, "lr": 0.001, "model": "coplenet", "fedbn": False}
    records = {"signature": {"sig": b"\x01\x02", "scheme": "rsa"}, "privacy": {"clip-norm": 1.0}}
    arrays = {"enc.0.weight": np.zeros((4, 1, 3, 3)), "bn.steps": np.zeros(()), "b": np.ones(4)}

    flat = flatten_records(config, arrays, records)

    shapes = {"enc.0.weight": (4, 1, 3, 3), "bn.steps": (), "b": (4,)}
    assert split_records(flat) == (config, shapes, records)
    assert flat["fedmed.keys"] == "enc.0.weight,bn.steps,b"


def test_no_arrays_and_no_records_round_trip() -> None:
    assert split_records(flatten_records({"a": 1}, {}, {})) == ({"a": 1}, {}, {})


def test_mismatched_names_and_shapes_are_refused() -> None:
    flat = flatten_records({}, {"a": np.zeros(2), "b": np.zeros(3)}, {})
    flat["fedmed.shapes"] = "2"
    with pytest.raises(ValueError, match="names 2 arrays but gives 1 shapes"):
        split_records(flat)


@pytest.mark.parametrize("weights", [(12, 40, 7), (900, 1, 50)])
def test_tolerance_bounds_the_error_of_flowers_quantized_weighted_mean(weights) -> None:
    # What SecAgg+ computes, without the masks (they cancel exactly in modular arithmetic):
    # each site quantizes ratio * update, the server sums, dequantizes and divides by the
    # summed ratios.
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.05, size=1000) for _ in weights]
    clip, max_weight = 8.0, 1000.0
    summed = np.zeros(1000, dtype=np.int64)
    for n, update in zip(weights, updates, strict=True):
        (q,) = quantize([update * (n / max_weight)], clip, QUANTIZATION_RANGE)
        summed += q.astype(np.int64)
    (total,) = dequantize([summed], clip, QUANTIZATION_RANGE)
    total += -(len(weights) - 1) * clip
    secure_mean = total / sum(n / max_weight for n in weights)
    exact = np.average(updates, axis=0, weights=weights)

    error = float(np.max(np.abs(secure_mean - exact)))
    bound = quantization_tolerance(weights, clip_range=clip, max_weight=max_weight)

    assert 0 < error <= bound
    assert bound < 1e-3
