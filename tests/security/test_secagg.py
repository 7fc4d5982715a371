"""SecAgg+ message format and quantization bound (the protocol itself runs in the e2e tests)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedmed import wire
from fedmed.security.secagg import (
    QUANTIZATION_RANGE,
    flatten_records,
    join_update,
    quantization_tolerance,
    split_records,
    split_update,
)


def test_records_round_trip_through_one_legacy_config() -> None:
    config = {"server-round": 3, "lr": 0.001, "model": "coplenet", "fedbn": False}
    records = {"signature": {"sig": b"\x01\x02", "scheme": "rsa"}, "privacy": {"clip-norm": 1.0}}
    arrays = {"enc,0.weight": np.zeros((4, 1, 3, 3)), "bn.steps": np.zeros((), np.int64)}
    payload, index = wire.pack_array(arrays)

    flat = flatten_records(config, index, records)

    # Flower's legacy FitIns config takes scalars only
    assert all(isinstance(v, (bool, int, float, str, bytes)) for v in flat.values())
    assert split_records(flat) == (config, index, records)
    back = wire.unpack_array(payload, split_records(flat)[1])
    assert list(back) == ["enc,0.weight", "bn.steps"] and back["bn.steps"].shape == ()


def test_a_config_without_the_arrays_index_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no arrays index 'fedmed\.arrays-index'"):
        split_records({"server-round": 1})
    with pytest.raises(ValueError, match=r"'fedmed\.arrays-index' is not JSON"):
        split_records({"fedmed.arrays-index": "{nope"})


def test_update_is_one_vector_and_splits_back_into_the_model_arrays() -> None:
    received = {"w": np.ones((2, 3), np.float32), "steps": np.array(4, np.int64)}
    trained = {"w": np.full((2, 3), 1.5, np.float32), "steps": np.array(6, np.int64)}

    flat = join_update(trained, received)

    assert flat.dtype == np.float64 and flat.shape == (7,)
    back = split_update(flat, received)
    assert back["w"].shape == (2, 3) and np.allclose(back["w"], 0.5)
    assert back["steps"].shape == () and back["steps"] == 2.0
    with pytest.raises(ValueError, match="holds 6 values but the model has 7"):
        split_update(flat[:6], received)


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


def test_update_order_is_the_keys_sorted_order_not_the_messages() -> None:
    # the signature covers arrays by name: a reordered index must not scramble the aggregate
    received = {"b": np.zeros(2), "a": np.zeros(3)}
    trained = {"a": np.arange(3.0), "b": np.array([7.0, 8.0])}
    reordered = {"a": received["a"], "b": received["b"]}

    flat = join_update(trained, received)

    np.testing.assert_array_equal(flat, [0.0, 1.0, 2.0, 7.0, 8.0])
    np.testing.assert_array_equal(flat, join_update(trained, reordered))
    assert list(split_update(flat, received)) == ["b", "a"]
    np.testing.assert_array_equal(split_update(flat, received)["b"], [7.0, 8.0])


def test_complex_arrays_cannot_be_securely_aggregated() -> None:
    with pytest.raises(ValueError, match="array 'z' is complex"):
        join_update({"z": np.ones(2, np.complex64)}, {"z": np.zeros(2, np.complex64)})
