from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from fedmed.errors import DataError
from fedmed.transforms import (
    Compose,
    CropForegroundd,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    invert,
    invert_to_original,
    save_prediction,
)

KEYS = ("image", "label")


def _pipeline(pixdim: tuple[float, float, float]) -> Compose:
    return Compose(
        [
            LoadImaged(KEYS),
            Orientationd(KEYS),
            Spacingd(KEYS, pixdim),
            ScaleIntensityRanged("image", a_min=-1000.0, a_max=400.0),
            CropForegroundd(KEYS, "image", margin=2),
            SpatialPadd(KEYS, (48, 48, 24)),
        ]
    )


@pytest.mark.parametrize(
    ("case", "pixdim"), [("lps", (0.4, 0.35, 1.25)), ("permuted", (0.45, 0.3, 1.0))]
)
def test_invert_maps_a_label_back_to_the_file_geometry(nifti_cases, case, pixdim):
    # Prepare
    item = _pipeline(pixdim)(nifti_cases[case])
    assert len(item["label_meta"]["history"]) == 4

    # Execute
    back = invert(item, "label")

    # Assert
    expected = nib.load(nifti_cases[case]["label"])
    assert back["label"].shape == (1, *expected.shape)
    assert back["label_meta"]["history"] == []
    np.testing.assert_allclose(back["label_meta"]["affine"].numpy(), expected.affine, atol=1e-6)
    np.testing.assert_array_equal(back["label"][0].numpy(), np.asarray(expected.dataobj))


def test_save_prediction_writes_the_original_grid_and_affine(nifti_cases, tmp_path):
    item = _pipeline((1.2, 1.0, 3.0))(nifti_cases["permuted"])
    prediction = (item["image"] > 0.5).to(torch.uint8)  # any map on the transformed grid

    path = save_prediction(tmp_path / "pred.nii.gz", prediction, item["image_meta"])

    written, source = nib.load(path), nib.load(nifti_cases["permuted"]["image"])
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1}


def test_invert_probabilities_keeps_channels_and_interpolates(item):
    out = Compose([Spacingd(KEYS, (1.6, 1.4, 5.0)), SpatialPadd(KEYS, (16, 16, 8))])(item)
    probabilities = torch.softmax(torch.randn(2, *out["image"].shape[1:]), dim=0)

    restored = invert_to_original(probabilities, out["image_meta"])

    assert restored.shape == (2, *item["image"].shape[1:])
    assert restored.dtype == torch.float32
    torch.testing.assert_close(restored.sum(0), torch.ones(restored.shape[1:]))


def test_invert_of_a_squeezed_slice_is_refused(item):
    sample = RandCropByPosNegLabeld(KEYS, "label", (8, 8, 1), squeeze_depth=True)(item)[0]

    with pytest.raises(DataError, match="a squeezed 2D slice cannot be mapped back"):
        invert(sample, "label")


def test_invert_missing_key_is_named(item):
    with pytest.raises(DataError, match="key 'pred' is not in the data item"):
        invert(item, "pred")
