from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmed.errors import DataError
from fedmed.transforms import (
    CropForegroundd,
    Flipd,
    Orientationd,
    Rotate90d,
    Spacingd,
    SpatialCropd,
    SpatialPadd,
)

KEYS = ("image", "label")

# (transform, image values after the round trip: "exact" or "approx"; labels "exact" or None)
ROUND_TRIPS = [
    pytest.param(Orientationd(KEYS), "exact", "exact", id="orientation"),
    pytest.param(Orientationd(KEYS, "LPI"), "exact", "exact", id="orientation-lpi"),
    pytest.param(Spacingd(KEYS, (0.4, 0.35, 1.25)), "approx", "exact", id="spacing-up"),
    pytest.param(Spacingd(KEYS, (1.2, 1.0, 3.0)), "coarse", None, id="spacing-down"),
    pytest.param(SpatialCropd(KEYS, (2, 3, 1), (15, 14, 9)), "box", "box", id="crop"),
    pytest.param(CropForegroundd(KEYS, "image", margin=1), "exact", "exact", id="crop-foreground"),
    pytest.param(SpatialPadd(KEYS, (25, 16, 15)), "exact", "exact", id="pad"),
    pytest.param(Flipd(KEYS, (0, 2)), "exact", "exact", id="flip"),
    pytest.param(Rotate90d(KEYS, 1, spatial_axes=(0, 1)), "exact", "exact", id="rot90-k1"),
    pytest.param(Rotate90d(KEYS, 3, spatial_axes=(1, 2)), "exact", "exact", id="rot90-k3"),
]


@pytest.mark.parametrize(("transform", "image_values", "label_values"), ROUND_TRIPS)
def test_transform_then_inverse_restores_values_shape_affine_and_history(
    item, transform, image_values, label_values
):
    # Execute
    out = transform(item)
    back = transform.inverse()(out)

    # Assert
    name = type(transform).__name__
    assert out["image_meta"]["history"][-1]["name"] == name
    assert item["image_meta"]["history"] == []  # the input's meta was not edited
    for key in KEYS:
        meta = back[f"{key}_meta"]
        assert back[key].shape == item[key].shape
        assert back[key].dtype == item[key].dtype
        assert meta["history"] == []
        torch.testing.assert_close(meta["affine"], item[f"{key}_meta"]["affine"])
        np.testing.assert_allclose(meta["spacing"], item[f"{key}_meta"]["spacing"])
    for key, values in (("image", image_values), ("label", label_values)):
        expected = item[key]
        if values == "box":  # a crop keeps the box; the undo fills the rest with zeros
            expected = torch.zeros_like(expected)
            expected[:, 2:15, 3:14, 1:9] = item[key][:, 2:15, 3:14, 1:9]
        if values in ("exact", "box"):
            assert torch.equal(back[key], expected)
        elif values is not None:
            tolerance = 0.03 if values == "approx" else 0.08  # coarse: detail lost downsampling
            assert (back[key] - expected).abs().mean() < tolerance


def test_orientation_matches_monai(nifti_cases):
    monai_transforms = pytest.importorskip("monai.transforms")
    from fedmed.transforms import LoadImaged

    # Prepare
    ours = LoadImaged("image")(nifti_cases["permuted"])
    load = monai_transforms.LoadImaged("image", ensure_channel_first=True, image_only=True)
    theirs = load({"image": str(nifti_cases["permuted"]["image"])})

    # Execute
    ours = Orientationd("image", "RAS")(ours)
    theirs = monai_transforms.Orientationd("image", axcodes="RAS")(theirs)

    # Assert
    np.testing.assert_array_equal(ours["image"].numpy(), theirs["image"].numpy())
    np.testing.assert_allclose(ours["image_meta"]["affine"].numpy(), theirs["image"].affine.numpy())


def test_orientation_to_ras_gives_positive_diagonal(permuted_item):
    out = Orientationd(KEYS)(permuted_item)

    affine = out["image_meta"]["affine"][:3, :3]
    assert torch.all(affine.diagonal() > 0)
    assert torch.count_nonzero(affine) == 3
    np.testing.assert_allclose(out["image_meta"]["spacing"], [0.9, 0.6, 2.0])
    assert out["image"].shape == (1, 16, 12, 20)


def test_spacing_sets_target_spacing_and_keeps_world_positions(item):
    out = Spacingd(KEYS, (1.6, 1.4, 5.0))(item)

    np.testing.assert_allclose(out["image_meta"]["spacing"], [1.6, 1.4, 5.0])
    assert out["image"].shape == (1, 10, 8, 6)
    assert set(torch.unique(out["label"]).tolist()) <= {0, 1, 2}
    # the centre of the field of view stays where it was in world space
    before, after = item["image_meta"]["affine"], out["image_meta"]["affine"]
    centre_before = before @ torch.tensor([9.5, 7.5, 5.5, 1.0], dtype=torch.float64)
    centre_after = after @ torch.tensor([4.5, 3.5, 2.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(centre_before, centre_after)


def test_flip_and_rotate_affine_point_to_the_same_world_position(item):
    item["image"] = item["image"].clone()
    item["image"][0, 3, 4, 5] = 9.0
    for transform in (Flipd(KEYS, 1), Rotate90d(KEYS, 1, spatial_axes=(0, 2))):
        out = transform(item)
        # the voxel holding the max moves, its world coordinate does not
        flat_in = int(item["image"][0].argmax())
        flat_out = int(out["image"][0].argmax())
        idx_in = np.unravel_index(flat_in, item["image"].shape[1:])
        idx_out = np.unravel_index(flat_out, out["image"].shape[1:])
        world_in = item["image_meta"]["affine"] @ torch.tensor([*idx_in, 1], dtype=torch.float64)
        world_out = out["image_meta"]["affine"] @ torch.tensor([*idx_out, 1], dtype=torch.float64)
        torch.testing.assert_close(world_in, world_out)


def test_inverse_of_a_different_transform_is_refused(item):
    out = Flipd(KEYS, 0)(item)

    with pytest.raises(DataError, match="last recorded step is 'Flipd', not 'SpatialPadd'"):
        SpatialPadd(KEYS, (30, 30, 30)).inverse()(out)


def test_orientation_without_meta_names_the_meta_key(item):
    bare = {"image": item["image"]}

    with pytest.raises(DataError, match="'image_meta' is not in the data item"):
        Orientationd("image")(bare)


def test_missing_key_error_names_the_key(item):
    with pytest.raises(DataError, match="key 'mask' is not in the data item"):
        Flipd(("image", "mask"), 0)(item)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Spacingd(KEYS, (1.0, 0.0, 1.0)), "pixdim must be three positive"),
        (lambda: Orientationd(KEYS, "XYZ"), "axcodes must"),
        (lambda: Rotate90d(KEYS, 1, spatial_axes=(1, 1)), "spatial_axes must be two different"),
        (lambda: SpatialPadd(KEYS, (0, 4, 4)), "spatial_size entries must be >= 1 or -1"),
        (lambda: SpatialCropd(KEYS, (4, 0, 0), (2, 5, 5)), "roi_start < roi_end"),
        (lambda: CropForegroundd(KEYS, "image", margin=-1), "margin must be >= 0"),
        (lambda: Flipd(KEYS, 0.5), "spatial_axis must be integers"),
    ],
    ids=["pixdim", "axcodes", "rot-axes", "pad-size", "crop-box", "margin", "flip-axis"],
)
def test_invalid_parameters_raise_value_error_naming_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_flip_axis_out_of_range_names_the_parameter(item):
    with pytest.raises(ValueError, match=r"spatial_axis=\(3,\) is out of range"):
        Flipd("image", 3)(item)


def test_orientation_of_a_two_dimensional_slice_is_refused(item):
    sliced = {**item, "image": item["image"][..., 0]}

    with pytest.raises(DataError, match=r"'image' must be a channel-first 3D volume"):
        Orientationd("image")(sliced)
