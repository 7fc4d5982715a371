"""The site data check: each problem found, named by file, all reported at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nifti_files import raw_header, write_raw

from fedmed.errors import ConfigError, DataError
from fedmed.io.check import Problem, check_case, check_image, check_site_folder, ensure_case_ok
from fedmed.io.nifti import read_nifti, write_nifti

# The geometry of the ``site`` fixture (tests/io/conftest.py).
SITE_SHAPE = (16, 16, 8)
SITE_AFFINE = np.array(
    [[0.8, 0, 0, -6.0], [0, 0.8, 0, -6.0], [0, 0, 2.5, -10.0], [0, 0, 0, 1]], dtype=np.float64
)


def _image(site: Path, case_id: str = "p02") -> Path:
    return site / "imagesTr" / f"{case_id}.nii.gz"


def _label(site: Path, case_id: str = "p02") -> Path:
    return site / "labelsTr" / f"{case_id}.nii.gz"


def _only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def test_clean_site_has_no_problems(site: Path) -> None:
    assert check_site_folder(site) == []


def test_demo_sites_are_clean(demo_root: Path) -> None:
    for name in ("site-A", "site-B", "site-C", "holdout"):
        assert check_site_folder(demo_root / name) == [], name


def test_problem_str_is_path_then_message() -> None:
    assert str(Problem(Path("a/b.nii.gz"), "broken")) == "a/b.nii.gz: broken"


def test_truncated_gz_image_is_reported(site: Path) -> None:
    data = _image(site).read_bytes()
    _image(site).write_bytes(data[: len(data) // 2])

    problem = _only(check_site_folder(site))

    assert problem.path == _image(site)
    assert "truncated or corrupt" in problem.message


def test_garbage_file_is_not_a_readable_nifti(site: Path) -> None:
    _label(site).write_bytes(b"not a nifti at all")

    problem = _only(check_site_folder(site))

    assert problem.path == _label(site)
    assert "not a readable NIfTI file" in problem.message


def test_shape_mismatch_names_the_label_and_both_shapes(site: Path) -> None:
    write_nifti(_label(site), np.zeros((16, 16, 7), np.uint8), SITE_AFFINE)

    problem = _only(check_site_folder(site))

    assert problem.path == _label(site)
    assert problem.message.startswith(
        "shape (16, 16, 7) differs from its image p02.nii.gz (16, 16, 8); re-export the label"
    )


def test_affine_mismatch_beyond_tolerance_is_reported(site: Path) -> None:
    shifted = SITE_AFFINE.copy()
    shifted[0, 3] += 0.5
    write_nifti(_label(site), read_nifti(_label(site)).array, shifted)

    problem = _only(check_site_folder(site))

    assert problem.path == _label(site)
    assert "affine differs from its image p02.nii.gz by up to 0.5 mm" in problem.message
    assert check_site_folder(site, affine_atol=0.6) == []


def test_affine_difference_within_tolerance_is_accepted(site: Path) -> None:
    nudged = SITE_AFFINE.copy()
    nudged[:3, :3] += 1e-5
    write_nifti(_label(site), read_nifti(_label(site)).array, nudged)

    assert check_site_folder(site) == []


def test_label_values_outside_declared_classes_are_listed(site: Path) -> None:
    label = np.zeros(SITE_SHAPE, np.int16)
    label[0, 0, 0], label[1, 1, 1], label[2, 2, 2] = 2, 7, -1
    write_nifti(_label(site), label, SITE_AFFINE)

    problem = _only(check_site_folder(site))

    assert problem.path == _label(site)
    assert problem.message.startswith("label values [-1, 2, 7] are not declared classes [0, 1]")
    assert 'dataset.json "labels"' in problem.message


def test_declared_extra_class_is_accepted(site: Path) -> None:
    label = np.zeros(SITE_SHAPE, np.uint8)
    label[0, 0, 0] = 2
    write_nifti(_label(site), label, SITE_AFFINE)
    meta = json.loads((site / "dataset.json").read_text())
    meta["labels"]["2"] = "consolidation"
    (site / "dataset.json").write_text(json.dumps(meta))

    assert check_site_folder(site) == []


def test_non_integer_label_values_are_reported(site: Path) -> None:
    label = np.zeros(SITE_SHAPE, np.float32)
    label[3, 3, 3] = 0.5
    label[4, 4, 4] = 1.0
    write_nifti(_label(site), label, SITE_AFFINE)

    problem = _only(check_site_folder(site))

    assert problem.message.startswith("1 voxels have non-integer label values (e.g. 0.5)")


def test_nan_and_inf_in_an_image_are_counted(site: Path) -> None:
    image = read_nifti(_image(site)).array.copy()
    image[0, 0, :2] = np.nan
    image[5, 5, 5] = np.inf
    write_nifti(_image(site), image, SITE_AFFINE)

    problem = _only(check_site_folder(site))

    assert problem.path == _image(site)
    assert problem.message.startswith("3 voxels are NaN or infinite")


def test_empty_folder_is_one_problem(tmp_path: Path) -> None:
    problem = _only(check_site_folder(tmp_path))

    assert problem.path == tmp_path
    assert problem.message.startswith("empty folder")


def test_missing_folder_is_one_problem(tmp_path: Path) -> None:
    problem = _only(check_site_folder(tmp_path / "gone"))

    assert "site data folder not found" in problem.message


def test_unknown_layout_is_one_problem(tmp_path: Path) -> None:
    (tmp_path / "scan.nii.gz").write_bytes(b"")

    problem = _only(check_site_folder(tmp_path))

    assert problem.message.startswith("unknown layout")


def test_dataset_json_entries_pointing_at_missing_files_are_named(site: Path) -> None:
    meta = json.loads((site / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/p09.nii.gz", "label": "./labelsTr/p09.nii.gz"})
    (site / "dataset.json").write_text(json.dumps(meta))

    problems = check_site_folder(site)

    assert [str(p) for p in problems] == [
        f'{_image(site, "p09")}: image listed in dataset.json "training" (case p09) not found; '
        "fix the path or restore the file",
        f'{_label(site, "p09")}: label listed in dataset.json "training" (case p09) not found; '
        "fix the path or restore the file",
    ]


def test_missing_test_image_is_named(site: Path) -> None:
    meta = json.loads((site / "dataset.json").read_text())
    meta["test"] = ["./imagesTs/t01.nii.gz"]
    (site / "dataset.json").write_text(json.dumps(meta))

    problem = _only(check_site_folder(site))

    assert (
        str(problem)
        == f'{site / "imagesTs" / "t01.nii.gz"}: listed in dataset.json "test" but not found'
    )


def test_label_without_image_in_msd_layout(site: Path) -> None:
    write_nifti(_label(site, "p07"), np.zeros(SITE_SHAPE, np.uint8), SITE_AFFINE)

    problem = _only(check_site_folder(site))

    assert problem.path == _label(site, "p07")
    assert problem.message.startswith("label without image: no p07 image in imagesTr/")


def test_unlisted_pair_in_msd_layout(site: Path) -> None:
    meta = json.loads((site / "dataset.json").read_text())
    meta["training"] = meta["training"][:2]
    (site / "dataset.json").write_text(json.dumps(meta))

    problem = _only(check_site_folder(site))

    assert problem.path == _label(site, "p03")
    assert 'is listed in dataset.json "training"' in problem.message


def test_label_and_image_without_partner_in_pairs_layout(tmp_path: Path) -> None:
    zeros = np.zeros(SITE_SHAPE, np.uint8)
    write_nifti(tmp_path / "a_img.nii.gz", zeros, SITE_AFFINE)
    write_nifti(tmp_path / "a_seg.nii.gz", zeros, SITE_AFFINE)
    write_nifti(tmp_path / "b_seg.nii.gz", zeros, SITE_AFFINE)
    write_nifti(tmp_path / "c_img.nii.gz", zeros, SITE_AFFINE)

    problems = check_site_folder(tmp_path)

    assert [str(p) for p in problems] == [
        f"{tmp_path / 'b_seg.nii.gz'}: label without image: b_img.nii.gz not found beside it",
        f"{tmp_path / 'c_img.nii.gz'}: image without label: c_seg.nii.gz not found beside it",
    ]


@pytest.mark.parametrize("workers", [1, 3])
def test_every_problem_is_reported_at_once(site: Path, workers: int) -> None:
    # Prepare: five different problems in one folder
    write_nifti(_label(site, "p01"), np.zeros((16, 16, 7), np.uint8), SITE_AFFINE)
    data = _image(site, "p02").read_bytes()
    _image(site, "p02").write_bytes(data[: len(data) // 2])
    bad = np.full(SITE_SHAPE, 3, np.uint8)
    write_nifti(_label(site, "p03"), bad, SITE_AFFINE)
    write_nifti(_label(site, "p08"), bad, SITE_AFFINE)
    meta = json.loads((site / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/p09.nii.gz", "label": "./labelsTr/p03.nii.gz"})
    (site / "dataset.json").write_text(json.dumps(meta))

    # Execute
    problems = check_site_folder(site, workers=workers)

    # Assert
    by_file = {(p.path.name, p.path.parent.name): p.message for p in problems}
    assert len(problems) == 5, [str(p) for p in problems]
    assert by_file[("p01.nii.gz", "labelsTr")].startswith("shape (16, 16, 7)")
    assert "truncated or corrupt" in by_file[("p02.nii.gz", "imagesTr")]
    assert by_file[("p03.nii.gz", "labelsTr")].startswith("label values [3]")
    assert by_file[("p08.nii.gz", "labelsTr")].startswith("label without image")
    assert "not found" in by_file[("p09.nii.gz", "imagesTr")]
    assert problems == check_site_folder(site, workers=1)  # same order in any case


def test_check_case_accepts_a_trailing_singleton_channel_in_the_label(tmp_path: Path) -> None:
    write_nifti(tmp_path / "i.nii.gz", np.zeros(SITE_SHAPE, np.float32), SITE_AFFINE)
    write_nifti(tmp_path / "l.nii.gz", np.zeros((*SITE_SHAPE, 1), np.uint8), SITE_AFFINE)

    assert check_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", {0, 1}) == []


def test_check_image_reports_missing_file(tmp_path: Path) -> None:
    problem = _only(check_image(tmp_path / "x.nii.gz"))

    assert str(problem) == f"{tmp_path / 'x.nii.gz'}: file not found"


def test_ensure_case_ok_raises_with_every_problem_and_passes_clean_cases(site: Path) -> None:
    ensure_case_ok(_image(site), _label(site), {0, 1})
    image = read_nifti(_image(site)).array.copy()
    image[0, 0, 0] = np.nan
    write_nifti(_image(site), image, SITE_AFFINE)
    write_nifti(_label(site), np.full(SITE_SHAPE, 5, np.uint8), SITE_AFFINE)

    with pytest.raises(DataError) as info:
        ensure_case_ok(_image(site), _label(site), {0, 1})

    message = str(info.value)
    assert f"{_image(site)}: 1 voxels are NaN or infinite" in message
    assert f"{_label(site)}: label values [5] are not declared classes [0, 1]" in message


def test_workers_must_be_positive(site: Path) -> None:
    with pytest.raises(ConfigError, match="workers must be >= 1, got 0"):
        check_site_folder(site, workers=0)


def test_two_channel_image_is_reported(site: Path) -> None:
    two = np.stack([read_nifti(_image(site)).array] * 2, axis=-1)
    write_nifti(_image(site), two, SITE_AFFINE)

    problem = _only(check_site_folder(site))

    assert problem.path == _image(site)
    assert problem.message.startswith("2 channels (shape (16, 16, 8, 2)); fedmed's models read")


@pytest.mark.parametrize(
    ("dtype", "datatype", "match"),
    [
        (np.complex64, None, "complex voxels (complex64)"),
        (np.uint8, 128, "RGB colour voxels (NIfTI datatype 128)"),
    ],
    ids=["complex", "rgb"],
)
def test_complex_and_rgb_images_are_reported(site: Path, dtype, datatype, match) -> None:
    header = raw_header(SITE_SHAPE, dtype, datatype=datatype, affine=SITE_AFFINE)
    write_raw(_image(site), header, bytes(8 * int(np.prod(SITE_SHAPE))))

    problem = _only(check_site_folder(site))

    assert problem.path == _image(site)
    assert problem.message.startswith(match)


@pytest.mark.parametrize(
    "affine",
    [
        np.zeros((4, 4)),
        np.array([[0.8, 0.8, 0, 0], [0.8, 0.8, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1]]),
    ],
    ids=["all-zero", "singular"],
)
def test_degenerate_affine_is_reported(site: Path, affine: np.ndarray) -> None:
    image = read_nifti(_image(site)).array.tobytes(order="F")
    label = read_nifti(_label(site)).array.tobytes(order="F")
    write_raw(_image(site), raw_header(SITE_SHAPE, np.float32, affine=affine), image)
    write_raw(_label(site), raw_header(SITE_SHAPE, np.uint8, affine=affine), label)

    problem = _only(check_site_folder(site))

    assert problem.path == _image(site)
    assert problem.message.startswith("its affine is degenerate (voxel volume 0 mm^3")


def test_label_50_mm_off_its_image_is_reported(site: Path) -> None:
    shifted = SITE_AFFINE.copy()
    shifted[2, 3] += 50.0
    write_nifti(_label(site), read_nifti(_label(site)).array, shifted)

    problem = _only(check_site_folder(site))

    assert problem.path == _label(site)
    assert "affine differs from its image p02.nii.gz by up to 50 mm" in problem.message


def test_image_above_the_memory_limit_is_reported_without_reading_it(site: Path) -> None:
    # 16 x 16 x 8 float32 = 8 KiB per image, uint8 = 2 KiB per label
    problems = check_site_folder(site, max_image_bytes=4096)

    assert [p.path.parent.name for p in problems] == ["imagesTr"] * 3
    assert all("above the per-image limit" in p.message for p in problems)


def test_control_characters_in_file_names_are_escaped(tmp_path: Path) -> None:
    # Prepare: a pairs-layout folder whose label names hold an escape sequence and a newline
    zeros = np.zeros(SITE_SHAPE, np.uint8)
    write_nifti(tmp_path / "a_img.nii.gz", zeros, SITE_AFFINE)
    write_nifti(tmp_path / "a\x1b[2J\nfake_seg.nii.gz", zeros, SITE_AFFINE)

    # Execute
    problems = [str(p) for p in check_site_folder(tmp_path)]

    # Assert: each problem is one printable line, the names visibly escaped
    assert len(problems) == 2
    assert all(text.isprintable() for text in problems)
    assert any("a\\x1b[2J\\nfake_seg.nii.gz: label without image" in text for text in problems)


def test_symlink_out_of_the_folder_is_reported_unless_allowed(site: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.nii.gz"
    _image(site).rename(outside)
    _image(site).symlink_to(outside)

    problem = _only(check_site_folder(site))

    assert problem.path == _image(site)
    assert "a symbolic link to" in problem.message and "allow-external-links" in problem.message
    assert check_site_folder(site, allow_external_links=True) == []
