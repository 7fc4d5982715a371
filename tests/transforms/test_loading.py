from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from fedmed.errors import DataError
from fedmed.transforms import LABEL_DTYPE, LoadImaged


def test_load_builds_channel_first_tensors_and_meta(nifti_cases, lps_affine, case_shape):
    item = LoadImaged(("image", "label"))(nifti_cases["lps"])

    assert item["image"].shape == (1, *case_shape) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, *case_shape) and item["label"].dtype == LABEL_DTYPE
    assert set(torch.unique(item["label"]).tolist()) == {0, 1, 2}
    meta = item["image_meta"]
    assert meta["affine"].dtype == torch.float64
    np.testing.assert_allclose(meta["affine"].numpy(), lps_affine)
    np.testing.assert_allclose(meta["original_affine"].numpy(), lps_affine)
    assert meta["original_shape"] == list(case_shape)
    np.testing.assert_allclose(meta["spacing"], [0.8, 0.7, 2.5])
    assert meta["filename"].endswith("lps_img.nii.gz")
    assert meta["history"] == []
    expected = nib.load(nifti_cases["lps"]["image"]).get_fdata()
    np.testing.assert_allclose(item["image"][0].numpy(), expected, rtol=1e-6)


def test_load_four_dimensional_file_puts_channels_first(tmp_path):
    array = np.random.default_rng(0).random((5, 4, 3, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "multi.nii.gz")

    item = LoadImaged("image")({"image": tmp_path / "multi.nii.gz"})

    assert item["image"].shape == (2, 5, 4, 3)
    np.testing.assert_allclose(item["image"][1].numpy(), array[..., 1])
    assert item["image_meta"]["original_shape"] == [5, 4, 3]


def test_load_missing_key_names_it(nifti_cases):
    with pytest.raises(DataError, match="key 'mask' is not in the data item"):
        LoadImaged(("image", "mask"))(nifti_cases["lps"])


def test_load_label_with_fractional_values_is_rejected(tmp_path):
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), 0.5, np.float32), np.eye(4)), tmp_path / "l.nii")

    with pytest.raises(DataError, match=r"l\.nii: label values must be whole numbers"):
        LoadImaged("label")({"label": tmp_path / "l.nii"})


def test_load_label_out_of_range_is_rejected(tmp_path):
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), -1000, np.int16), np.eye(4)), tmp_path / "l.nii")

    with pytest.raises(DataError, match=r"\[0, 255\].*is this an image"):
        LoadImaged("label")({"label": tmp_path / "l.nii"})


def test_load_non_path_value_is_rejected():
    with pytest.raises(DataError, match="'image' should be a NIfTI file path"):
        LoadImaged("image")({"image": 3})
