"""The demo-data generator: plausible CT, per-site scanner differences, determinism, storage."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmed.data.demo import (
    CLEAN_LABELS_DIRNAME,
    HOLDOUT_PROFILE,
    NOMINAL_FOV_MM,
    SITE_PROFILES,
    ScannerProfile,
    generate_case,
    generate_demo_federation,
    site_name,
    site_profile,
    write_demo_site,
)
from fedmed.errors import ConfigError, DataError
from fedmed.io.check import check_site_folder
from fedmed.io.msd import load_site_dataset
from fedmed.io.nifti import read_nifti

SHAPE = (32, 32, 16)  # the demo_root fixture's shape


def _stored_voxels(path: Path) -> bytes:
    return np.asarray(nib.load(path).dataobj.get_unscaled()).tobytes()


@pytest.mark.parametrize(
    ("index", "name"),
    [(0, "site-A"), (2, "site-C"), (25, "site-Z"), (26, "site-AA"), (27, "site-AB")],
)
def test_site_names_follow_spreadsheet_columns(index: int, name: str) -> None:
    assert site_name(index) == name


def test_demo_root_has_msd_sites_and_holdout(demo_root: Path) -> None:
    names = sorted(p.name for p in demo_root.iterdir())
    assert names == ["holdout", "site-A", "site-B", "site-C"]
    site = load_site_dataset(demo_root / "site-B")
    assert [c["case_id"] for c in site.cases] == [f"site-B_patient_{i:03d}" for i in range(3)]
    assert site.label_names == {0: "background", 1: "lesion"}
    meta = json.loads((demo_root / "site-C" / "dataset.json").read_text())
    assert meta["fedmed_demo"]["scanner"]["label_noise"] == SITE_PROFILES[2].label_noise
    assert len(load_site_dataset(demo_root / "holdout").cases) == 2


def test_generate_case_is_deterministic_per_seed() -> None:
    kwargs = {"site_index": 1, "case_index": 2, "profile": SITE_PROFILES[1], "shape": SHAPE}

    first, again = generate_case(seed=5, **kwargs), generate_case(seed=5, **kwargs)
    other = generate_case(seed=6, **kwargs)

    assert first.image.tobytes() == again.image.tobytes()
    assert first.label.tobytes() == again.label.tobytes()
    assert not np.array_equal(first.image, other.image)


def test_written_federation_has_identical_voxels_for_the_same_seed(tmp_path: Path) -> None:
    def write(out: Path, seed: int) -> list[Path]:
        generate_demo_federation(out, sites=3, cases=1, seed=seed, shape=(16, 16, 8), holdout=1)
        return sorted(out.glob("*/*Tr/*.nii.gz"))

    first, again, other = (
        write(tmp_path / "a", 0),
        write(tmp_path / "b", 0),
        write(tmp_path / "c", 1),
    )

    assert len(first) == 8
    for a, b, c in zip(first, again, other, strict=True):
        assert _stored_voxels(a) == _stored_voxels(b), a.name
        if "imagesTr" in a.parts:
            assert _stored_voxels(a) != _stored_voxels(c), a.name


def test_cases_do_not_depend_on_how_many_are_generated(tmp_path: Path) -> None:
    write_demo_site(
        tmp_path / "two", profile=SITE_PROFILES[0], site_index=0, cases=2, shape=(16, 16, 8)
    )
    write_demo_site(
        tmp_path / "three", profile=SITE_PROFILES[0], site_index=0, cases=3, shape=(16, 16, 8)
    )

    two = tmp_path / "two" / "imagesTr" / "two_patient_001.nii.gz"
    three = tmp_path / "three" / "imagesTr" / "three_patient_001.nii.gz"
    assert _stored_voxels(two) == _stored_voxels(three)


def test_phantom_has_chest_ct_values_and_both_lesion_kinds() -> None:
    quiet = dataclasses.replace(HOLDOUT_PROFILE, noise_sigma=0.0)
    cases = [
        generate_case(seed=0, site_index=0, case_index=i, profile=quiet, shape=(48, 48, 24))
        for i in range(8)
    ]

    image = cases[0].image
    assert image[0, 0, 0] == pytest.approx(-1000.0)  # air in the corner
    assert np.mean((image > -900) & (image < -800)) > 0.05  # lungs
    assert np.mean((image > 0) & (image < 80)) > 0.1  # soft tissue
    assert np.any((image > -120) & (image < -80))  # fat rim
    lesion_values = np.concatenate([c.image[c.label == 1] for c in cases])
    assert all(c.label.any() for c in cases)
    assert np.any(lesion_values < -400)  # ground glass
    assert np.any(lesion_values > -150)  # consolidation
    assert lesion_values.min() > -900


def _noise_and_offset(profile: ScannerProfile) -> tuple[float, float]:
    kwargs = {"seed": 0, "site_index": 0, "case_index": 0, "shape": SHAPE}
    noisy = generate_case(profile=profile, **kwargs).image
    clean = generate_case(
        profile=dataclasses.replace(profile, noise_sigma=0.0, hu_offset=0.0), **kwargs
    ).image
    unclipped = (clean > -900) & (clean < 300)
    diff = (noisy - clean)[unclipped]
    return float(diff.std()), float(diff.mean())


@pytest.mark.parametrize("index", [0, 1, 2], ids=["A", "B", "C"])
def test_sites_differ_in_noise_and_hu_offset(index: int) -> None:
    profile = SITE_PROFILES[index]

    sigma, offset = _noise_and_offset(profile)

    assert sigma == pytest.approx(profile.noise_sigma, rel=0.1)
    assert offset == pytest.approx(profile.hu_offset, abs=2.0)


def test_site_spacing_and_field_of_view_are_in_the_affine(demo_root: Path) -> None:
    spacings = {}
    for index, name in enumerate(("site-A", "site-B", "site-C")):
        first = load_site_dataset(demo_root / name).cases[0]
        spacing = read_nifti(first["image"]).spacing
        profile = SITE_PROFILES[index]
        expected = [
            NOMINAL_FOV_MM[0] / SHAPE[0] * profile.inplane_scale,
            NOMINAL_FOV_MM[1] / SHAPE[1] * profile.inplane_scale,
            NOMINAL_FOV_MM[2] / SHAPE[2] * profile.slice_scale,
        ]
        assert spacing == pytest.approx(expected)
        assert read_nifti(first["label"]).spacing == pytest.approx(expected)
        spacings[name] = spacing
    assert spacings["site-B"][0] < spacings["site-A"][0] < spacings["site-C"][0]  # zoom in / out
    assert spacings["site-B"][2] > spacings["site-A"][2] > spacings["site-C"][2]  # thick / thin


def test_noisy_site_perturbs_labels_but_not_images() -> None:
    noisy = SITE_PROFILES[2]
    clean = dataclasses.replace(noisy, label_noise=0.0)
    changed = 0
    for case_index in range(6):
        kwargs = {"seed": 0, "site_index": 2, "case_index": case_index, "shape": SHAPE}
        with_noise, without = (
            generate_case(profile=noisy, **kwargs),
            generate_case(profile=clean, **kwargs),
        )
        assert np.array_equal(with_noise.image, without.image)
        assert np.array_equal(with_noise.true_label, without.label)
        changed += not np.array_equal(with_noise.label, with_noise.true_label)
    assert noisy.label_noise > 0 and changed >= 2


def test_clean_sites_keep_true_labels() -> None:
    for index in (0, 1):
        for case_index in range(4):
            case = generate_case(
                seed=0,
                site_index=index,
                case_index=case_index,
                profile=SITE_PROFILES[index],
                shape=SHAPE,
            )
            assert np.array_equal(case.label, case.true_label)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["A", "B", "C"])
def test_int16_storage_with_scaling_round_trips_to_hu(demo_root: Path, index: int) -> None:
    profile = SITE_PROFILES[index]
    path = demo_root / site_name(index) / "imagesTr" / f"{site_name(index)}_patient_001.nii.gz"

    image = nib.load(path)
    volume = read_nifti(path)
    case = generate_case(seed=0, site_index=index, case_index=1, profile=profile, shape=SHAPE)

    assert image.get_data_dtype() == np.int16
    assert (image.dataobj.slope, image.dataobj.inter) == (profile.scl_slope, profile.scl_inter)
    assert np.abs(volume.array - case.image).max() <= profile.scl_slope / 2 + 1e-3
    np.testing.assert_allclose(volume.affine, case.affine)
    assert np.array_equal(read_nifti(path.parent.parent / "labelsTr" / path.name).array, case.label)


def test_at_least_one_default_site_uses_a_real_rescale() -> None:
    assert any(p.scl_slope != 1.0 for p in SITE_PROFILES)
    assert any(p.scl_inter != 0.0 for p in SITE_PROFILES)


def test_profiles_beyond_the_first_three_are_fixed_and_valid() -> None:
    assert site_profile(5) == site_profile(5)
    assert site_profile(5).label_noise > 0 and site_profile(4).label_noise == 0
    assert site_profile(4) != site_profile(3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_sigma": -1.0}, "noise_sigma must be >= 0"),
        ({"slice_scale": 0.0}, "must be > 0"),
        ({"label_noise": 1.5}, r"label_noise must be in \[0, 1\]"),
        ({"scl_slope": 0.01}, "cannot store"),
    ],
)
def test_invalid_profiles_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ScannerProfile(**kwargs)


def test_rerun_over_a_demo_folder_refreshes_it(tmp_path: Path) -> None:
    kwargs = {"profile": SITE_PROFILES[0], "site_index": 0, "shape": (16, 16, 8)}
    write_demo_site(tmp_path / "site-A", cases=3, **kwargs)

    write_demo_site(tmp_path / "site-A", cases=2, **kwargs)

    assert len(list((tmp_path / "site-A" / "imagesTr").iterdir())) == 2
    assert len(list((tmp_path / "site-A" / "labelsTr").iterdir())) == 2
    assert check_site_folder(tmp_path / "site-A") == []


def test_a_foreign_folder_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "site-A").mkdir()
    (tmp_path / "site-A" / "patients.csv").write_text("keep me")

    with pytest.raises(DataError, match="site-A: exists and is not a fedmed demo folder"):
        generate_demo_federation(tmp_path, sites=1, cases=1, shape=(16, 16, 8), holdout=0)
    assert (tmp_path / "site-A" / "patients.csv").read_text() == "keep me"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sites": 0}, "at least one site"),
        ({"holdout": -1}, "holdout must be >= 0"),
        ({"shape": (16, 16)}, "demo shape must be three sizes"),
        ({"profiles": [HOLDOUT_PROFILE]}, "got 1 scanner profiles for 3 sites"),
    ],
)
def test_invalid_federation_arguments_are_refused(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        generate_demo_federation(tmp_path, **kwargs)


def test_holdout_zero_writes_no_holdout_folder(tmp_path: Path) -> None:
    sites = generate_demo_federation(tmp_path, sites=2, cases=1, shape=(16, 16, 8), holdout=0)

    assert sites == [tmp_path / "site-A", tmp_path / "site-B"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-A", "site-B"]


def test_a_noisy_site_keeps_its_clean_labels_beside_the_noisy_ones(demo_root: Path) -> None:
    clean_dir = demo_root / "site-C" / CLEAN_LABELS_DIRNAME
    names = sorted(p.name for p in clean_dir.iterdir())
    assert names == sorted(p.name for p in (demo_root / "site-C" / "labelsTr").iterdir())
    differ = 0
    for index, name in enumerate(names):
        case = generate_case(
            seed=0, site_index=2, case_index=index, profile=SITE_PROFILES[2], shape=SHAPE
        )
        assert np.array_equal(read_nifti(clean_dir / name).array, case.true_label)
        differ += not np.array_equal(case.label, case.true_label)
    assert differ >= 1  # the noise the clean labels let validation see past
    assert not (demo_root / "site-A" / CLEAN_LABELS_DIRNAME).exists()
    assert check_site_folder(demo_root / "site-C") == []  # the extra folder is no problem


def test_a_folder_rewritten_without_label_noise_drops_its_clean_labels(tmp_path: Path) -> None:
    kwargs = {"site_index": 2, "cases": 2, "shape": (16, 16, 8)}
    write_demo_site(tmp_path / "site-C", profile=SITE_PROFILES[2], **kwargs)
    assert len(list((tmp_path / "site-C" / CLEAN_LABELS_DIRNAME).iterdir())) == 2
    write_demo_site(tmp_path / "site-C", profile=SITE_PROFILES[0], **kwargs)
    assert not (tmp_path / "site-C" / CLEAN_LABELS_DIRNAME).exists()
