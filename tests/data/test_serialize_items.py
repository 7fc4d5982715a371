"""Pickle-free item serialization: round trip of nested items, refusals, malformed blobs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedmed.data.serialize import SerializationError, dumps, loads


def test_nested_item_round_trips_values_types_and_dtypes() -> None:
    # Prepare
    image = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4)
    item = {
        "image": image,
        "label": torch.ones(1, 2, 3, 4, dtype=torch.uint8),
        "view": image[:, :, 1:],  # a non-contiguous view sharing storage with "image"
        "image_meta": {
            "affine": torch.eye(4, dtype=torch.float64),
            "spacing": (0.8, 0.8, 2.5),
            "history": [{"name": "Flip", "params": {"axes": [0]}}],
            "filename": Path("/data/p01.nii.gz"),
            "mask": np.array([True, False]),
        },
        "id": "p01",
        "weight": 0.5,
        "count": 3,
        "flag": None,
    }

    # Execute
    restored = loads(dumps(item))

    # Assert
    assert torch.equal(restored["image"], image)
    assert restored["label"].dtype == torch.uint8
    assert torch.equal(restored["view"], image[:, :, 1:])
    meta = restored["image_meta"]
    assert meta["affine"].dtype == torch.float64
    assert meta["spacing"] == (0.8, 0.8, 2.5)
    assert meta["history"] == [{"name": "Flip", "params": {"axes": [0]}}]
    assert meta["filename"] == Path("/data/p01.nii.gz")
    assert isinstance(meta["mask"], np.ndarray) and meta["mask"].tolist() == [True, False]
    assert (restored["id"], restored["weight"], restored["count"], restored["flag"]) == (
        "p01",
        0.5,
        3,
        None,
    )


def test_blob_is_safetensors_with_path_keys_and_no_pickle() -> None:
    blob = dumps({"image": torch.zeros(2), "meta": {"affine": torch.eye(4)}})
    assert b'"image"' in blob and b'"meta/affine"' in blob
    assert b"\x80\x04" not in blob[:2]  # no pickle protocol header
    assert b"__metadata__" in blob


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ({"fn": print}, "builtin_function_or_method cannot be cached"),
        ({1: torch.zeros(1)}, "dict key 1 is not a string"),
        ({"a": np.array([object()])}, "object arrays"),
        ({"__tensor__": 1}, "reserved"),
    ],
    ids=["callable", "int-key", "object-array", "reserved-key"],
)
def test_unstorable_values_are_refused_with_the_path(item: dict, match: str) -> None:
    with pytest.raises(SerializationError, match=match):
        dumps(item)


@pytest.mark.parametrize(
    ("cut", "match"),
    [
        (4, "too short"),
        (20, "exceeds the blob|unreadable"),
        (-3, "needs bytes 160..224 but the blob has 221"),
    ],
    ids=["header", "mid-header", "data"],
)
def test_truncated_blob_raises_serialization_error(cut: int, match: str) -> None:
    blob = dumps({"image": torch.zeros(16)})
    with pytest.raises(SerializationError, match=match):
        loads(blob[:cut])


def test_writable_buffer_is_read_in_place_without_copying() -> None:
    buffer = bytearray(dumps({"image": torch.arange(6, dtype=torch.float32)}))
    image = loads(buffer)["image"]
    start = (
        memoryview(buffer).tobytes().index(torch.arange(6, dtype=torch.float32).numpy().tobytes())
    )
    address = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr() + start
    assert image.data_ptr() == address
    assert image.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
