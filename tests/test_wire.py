"""All arrays of a message in one Flower Array: round trips and refused indexes."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents,
)

from fedmed.wire import (
    ALIGN,
    FORMAT,
    WireError,
    join_models,
    pack,
    pack_array,
    split_models,
    unpack,
    unpack_array,
    unpack_content,
)


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "fortran": np.asfortranarray(rng.standard_normal((3, 5))),
        "half": np.arange(3, dtype=np.float16),
        "empty": np.zeros((0, 4), np.float32),
        "mask": np.array([True, False, True]),
    }


def _index(records: dict, **changes) -> ConfigRecord:
    return ConfigRecord({**dict(records["arrays-index"]), **changes})


def test_round_trip_keeps_keys_order_values_dtypes_and_shapes(arrays):
    out = unpack_content(pack(arrays))
    assert list(out) == list(arrays)
    for key, value in arrays.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
        np.testing.assert_array_equal(out[key], value)
        assert out[key].flags.writeable and out[key].flags.aligned, key


def test_round_trip_through_flower_serialization(arrays):
    # Prepare: what a SuperLink stores and a site inflates
    content = RecordDict(pack(arrays))
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    # Execute
    inflated = inflate_object_from_contents(content.object_id, objects)
    # Assert
    out = unpack_content(inflated)
    assert all(np.array_equal(out[k], v) for k, v in arrays.items())


def test_one_array_holds_everything_with_little_padding(arrays):
    records = pack(arrays)
    assert list(records["arrays"]) == ["packed"]
    payload = records["arrays"]["packed"].numpy()  # plain .npy: Flower's own numpy() reads it
    raw = sum(v.nbytes for v in arrays.values())
    assert raw <= payload.size < raw + ALIGN * len(arrays)
    assert all(offset % ALIGN == 0 for offset in records["arrays-index"]["offsets"])
    assert records["arrays-index"]["format"] == FORMAT


def test_unpacked_arrays_do_not_share_memory_with_the_sender(arrays):
    out = unpack_content(pack(arrays))
    out["conv.bias"][:] = 0
    assert arrays["conv.bias"].any()


def test_object_arrays_are_refused():
    with pytest.raises(ValueError, match="'names' has dtype object"):
        pack({"names": np.array(["a", None], dtype=object)})


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format": "other"}, "has format 'other'"),
        ({"keys": ["a"]}, "lists differ in length: 1 keys"),
        ({"dtypes": ["<f4", "<f4", "|O", "<f8", "<f2", "<f4", "|b1"]}, "not a plain numeric"),
        ({"dtypes": ["<f4", "<f4", "xyz", "<f8", "<f2", "<f4", "|b1"]}, "unknown dtype 'xyz'"),
        ({"nbytes": 3}, "says the payload has 3 bytes"),
        ({"dims": [4, 1, 3, 3, 4]}, "ndims add up to 11 but it lists 5 dims"),
        ({"offsets": [0, 8, 160, 168, 288, 296, 296]}, "offsets must be multiples of 8"),
        ({"offsets": [0, 0, 160, 168, 288, 296, 296]}, "starts at byte 0: .*not overlap"),
        ({"dims": [4, 1, 3, 3, 4, 3, 5, 3, 400, 4, 3]}, "'empty' .* needs bytes"),
        ({"ndims": [-1, 1, 0, 2, 1, 2, 6]}, "'conv.weight' has ndim -1: it must be in"),
        ({"dims": [2**62, 1, 3, 3, 4, 3, 5, 3, 0, 4, 3]}, "'conv.weight' .* needs bytes"),
        ({"dims": [4, 1, 3, 3, 4, 3, 5, 3, -1, 4, 3]}, "negative dimension"),
        ({"keys": ["a", "a", "b", "c", "d", "e", "f"]}, "lists array 'a' twice"),
        ({"offsets": [0.0] * 7}, "'offsets' must be a list of int"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_an_index_that_does_not_match_the_payload_is_refused(arrays, changes, match):
    records = pack(arrays)
    assert records["arrays-index"]["offsets"] == [0, 144, 160, 168, 288, 296, 296]
    with pytest.raises(WireError, match=match):
        unpack(records["arrays"], _index(records, **changes))


def test_index_fields_missing_are_named(arrays):
    records = pack(arrays)
    index = dict(records["arrays-index"])
    del index["dims"], index["offsets"]
    with pytest.raises(WireError, match="lacks dims, offsets"):
        unpack(records["arrays"], ConfigRecord(index))


def test_per_array_records_from_an_older_sender_are_refused(arrays):
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    with pytest.raises(WireError, match=r"exactly one array 'packed'.*'conv\.weight'"):
        unpack(record, pack(arrays)["arrays-index"])


def test_a_packed_array_of_another_dtype_is_refused(arrays):
    record = ArrayRecord({"packed": Array(np.zeros(4, np.float32))})
    with pytest.raises(WireError, match="must be a flat uint8"):
        unpack(record, pack(arrays)["arrays-index"])


def test_content_without_the_index_is_refused(arrays):
    records = pack(arrays)
    with pytest.raises(WireError, match="no ConfigRecord 'arrays-index'"):
        unpack_content({"arrays": records["arrays"]})
    with pytest.raises(WireError, match="no ArrayRecord 'arrays'"):
        unpack_content({"arrays-index": records["arrays-index"]})


def test_pack_array_is_the_same_packing_as_a_numpy_array(arrays):
    payload, index = pack_array(arrays)
    records = pack(arrays)
    assert index == dict(records["arrays-index"])
    np.testing.assert_array_equal(payload, records["arrays"]["packed"].numpy())
    out = unpack_array(payload, index)
    for key, value in arrays.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
        np.testing.assert_array_equal(out[key], value)


def test_unpack_array_refuses_a_payload_that_is_not_flat_bytes(arrays):
    payload, index = pack_array(arrays)
    with pytest.raises(WireError, match="must be a flat uint8 array, got float32"):
        unpack_array(payload.astype(np.float32), index)
    with pytest.raises(WireError, match="says the payload has"):
        unpack_array(payload[:-8], index)


def test_several_models_share_one_payload_and_split_back():
    models = {"global-final": {"w": np.ones(2)}, "finetuned@B": {"w": np.zeros(2), "b": np.ones(1)}}
    back = split_models(unpack_content(pack(join_models(models))))
    assert sorted(back) == ["finetuned@B", "global-final"]
    assert sorted(back["finetuned@B"]) == ["b", "w"]
    np.testing.assert_array_equal(back["global-final"]["w"], models["global-final"]["w"])


@pytest.mark.parametrize("key", ["w", "::w", "global-final::"])
def test_a_key_without_a_model_label_or_name_is_refused(key):
    with pytest.raises(ValueError, match="is not '<model>::<key>'"):
        split_models({key: np.zeros(1)})
