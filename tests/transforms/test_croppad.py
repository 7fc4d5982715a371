from __future__ import annotations

import pytest
import torch

from fedmed.errors import DataError
from fedmed.transforms import CropForegroundd, SpatialCropd, SpatialPadd

KEYS = ("image", "label")


def test_crop_foreground_keeps_every_foreground_voxel(item):
    out = CropForegroundd(KEYS, "image", margin=0)(item)

    assert out["image"].shape[1:] < item["image"].shape[1:]
    assert out["image"].sum() == pytest.approx(float(item["image"].sum()), rel=1e-5)
    assert out["label"].data_ptr() >= item["label"].data_ptr()  # a view, not a copy


def test_crop_foreground_without_foreground_keeps_the_item(item):
    empty = {**item, "image": torch.zeros_like(item["image"])}

    out = CropForegroundd(KEYS, "image")(empty)

    assert out["image"].shape == item["image"].shape


def test_pad_reaches_minimum_size_symmetrically(item):
    out = SpatialPadd(KEYS, (24, -1, 13), value=0.0)(item)

    assert out["image"].shape == (1, 24, 16, 13)
    assert out["image_meta"]["history"][-1]["params"] == {"before": [2, 0, 0], "after": [2, 0, 1]}
    torch.testing.assert_close(out["image"][:, 2:22, :, 0:12], item["image"])


def test_crop_box_outside_the_item_is_refused(item):
    with pytest.raises(DataError, match=r"does not fit 'image' of spatial shape \[20, 16, 12\]"):
        SpatialCropd(KEYS, (0, 0, 0), (30, 4, 4))(item)


def test_crop_foreground_missing_source_is_named(item):
    with pytest.raises(DataError, match="source_key 'body' is not in the data item"):
        CropForegroundd(KEYS, "body")(item)


def test_crop_foreground_threshold_and_margin_set_the_box(item):
    mask = torch.zeros_like(item["image"])
    mask[:, 5:8, 4:6, 3:4] = 1.0

    out = CropForegroundd(KEYS, "mask", margin=(1, 0, 2))({**item, "mask": mask})

    assert out["image"].shape == (1, 5, 2, 5)
    assert out["image_meta"]["history"][-1]["params"]["start"] == [4, 4, 1]


def test_pad_with_wrong_number_of_axes_is_named(item):
    with pytest.raises(ValueError, match=r"spatial_size \(8, 8\) has 2 axes"):
        SpatialPadd(KEYS, (8, 8))(item)
