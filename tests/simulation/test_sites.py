from __future__ import annotations

import json

import numpy as np
import pytest
from fedmed.simulation.sites import ScannerShift, pooled_federation, shifted_federation

from fedmed.errors import ConfigError, DataError
from fedmed.io.msd import load_site_dataset, patient_id
from fedmed.io.nifti import read_nifti


def test_pooled_split_builds_disjoint_site_folders_and_a_holdout(pooled_root, tmp_path):
    # Execute
    data = pooled_federation(
        pooled_root,
        tmp_path,
        sites=3,
        method="size-skew",
        alpha=0.5,
        seed=0,
        holdout_fraction=0.25,
    )
    # Assert
    assert [p.name for p in data.sites] == ["site-A", "site-B", "site-C"]
    assert data.holdout is not None and data.holdout.name == "holdout"
    groups = [
        {patient_id(c["case_id"]) for c in load_site_dataset(p).cases}
        for p in (*data.sites, data.holdout)
    ]
    assert sum(len(g) for g in groups) == 8
    assert len(set().union(*groups)) == 8  # no patient in two folders
    image = data.sites[0] / "imagesTr"
    assert all(f.stat().st_nlink >= 2 for f in image.iterdir())  # linked, not copied


def test_pooled_split_rebuilds_its_own_folders(pooled_root, tmp_path):
    first = pooled_federation(pooled_root, tmp_path, sites=2, seed=0, holdout_fraction=0.0)
    again = pooled_federation(pooled_root, tmp_path, sites=2, seed=0, holdout_fraction=0.0)
    assert first == again and first.holdout is None
    assert len(load_site_dataset(again.sites[0]).cases) == 4


def test_pooled_split_refuses_a_foreign_folder(pooled_root, tmp_path):
    (tmp_path / "site-A").mkdir()
    (tmp_path / "site-A" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not made by fedmed-sim"):
        pooled_federation(pooled_root, tmp_path, sites=2, seed=0)


def test_label_skew_reads_lesion_burden(pooled_root, tmp_path):
    data = pooled_federation(
        pooled_root, tmp_path, sites=2, method="label-skew", alpha=1.0, holdout_fraction=0.0
    )
    assert sum(len(load_site_dataset(p).cases) for p in data.sites) == 8


def test_scanner_shift_adds_offset_and_noise_to_a_copy(pooled_root, tmp_path):
    # Execute
    shift = ScannerShift(hu_offset=100.0, noise_sigma=20.0)
    data = shifted_federation([pooled_root], tmp_path, shifts={0: shift}, holdout=None)
    # Assert
    (site,) = data.sites
    assert site == tmp_path / "site-A"
    source = load_site_dataset(pooled_root).cases[0]
    copy = load_site_dataset(site).cases[0]
    diff = read_nifti(copy["image"]).array - read_nifti(source["image"]).array
    assert float(diff.mean()) == pytest.approx(100.0, abs=2.0)
    assert float(diff.std()) == pytest.approx(20.0, abs=2.0)
    np.testing.assert_array_equal(
        read_nifti(copy["label"]).array, read_nifti(source["label"]).array
    )
    meta = json.loads((site / "dataset.json").read_text())
    assert meta["fedmed_sim"]["shift"]["hu_offset"] == 100.0


def test_scanner_shift_resamples_image_and_label_in_plane(pooled_root, tmp_path):
    data = shifted_federation(
        [pooled_root], tmp_path, shifts={0: ScannerShift(spacing_scale=2.0)}, holdout=None
    )
    source = load_site_dataset(pooled_root).cases[0]
    copy = load_site_dataset(data.sites[0]).cases[0]
    src_img, new_img = read_nifti(source["image"]), read_nifti(copy["image"])
    new_lbl = read_nifti(copy["label"])
    assert new_img.array.shape == (16, 16, 16) == new_lbl.array.shape
    np.testing.assert_allclose(new_img.spacing[:2], np.array(src_img.spacing[:2]) * 2)
    assert new_img.spacing[2] == pytest.approx(src_img.spacing[2])
    assert set(np.unique(new_lbl.array)) <= {0, 1}


def test_identity_shift_keeps_the_original_folder(pooled_root, tmp_path):
    data = shifted_federation([pooled_root], tmp_path, shifts={}, holdout=None)
    assert data.sites == (pooled_root,)


def test_shift_table_refuses_unknown_keys():
    with pytest.raises(ConfigError, match=r"unknown shift keys \['offset'\]"):
        ScannerShift.from_table({"offset": 3.0}, where="sim.toml [data.shift.site-A]")
