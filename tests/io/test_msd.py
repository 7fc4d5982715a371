"""Reading site folders (MSD and pairs layouts) and splitting cases by patient."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmed.errors import ConfigError, DataError
from fedmed.io.msd import (
    SiteDataset,
    case_id_from_path,
    load_site_dataset,
    patient_id,
    split_cases,
)
from fedmed.io.nifti import write_nifti

SHAPE = (6, 5, 4)


def _write_pair(image: Path, label: Path) -> None:
    write_nifti(image, np.zeros(SHAPE, np.float32), np.eye(4))
    write_nifti(label, np.zeros(SHAPE, np.uint8), np.eye(4))


def _msd_site(root: Path, ids: list[str], labels: object = None) -> Path:
    training = []
    for case_id in ids:
        _write_pair(
            root / "imagesTr" / f"{case_id}.nii.gz", root / "labelsTr" / f"{case_id}.nii.gz"
        )
        training.append(
            {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}
        )
    meta = {"training": training, "labels": labels or {"0": "background", "1": "lesion"}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_layout_lists_cases_with_absolute_paths_and_label_names(tmp_path: Path) -> None:
    root = _msd_site(tmp_path / "site-A", ["p01", "p02"], {"0": "background", "1": "ggo", "2": "c"})

    site = load_site_dataset(root)

    assert isinstance(site, SiteDataset)
    assert site.name == "site-A" and site.layout == "msd"
    assert site.label_names == {0: "background", 1: "ggo", 2: "c"}
    assert site.label_classes == frozenset({0, 1, 2})
    assert [c["case_id"] for c in site.cases] == ["p01", "p02"]
    assert site.cases[0]["image"] == str(root / "imagesTr" / "p01.nii.gz")
    assert site.cases[0]["label"] == str(root / "labelsTr" / "p01.nii.gz")
    assert Path(site.cases[0]["image"]).is_absolute()


def test_msd_reads_nnunet_v2_inverted_labels_and_test_list(tmp_path: Path) -> None:
    root = _msd_site(tmp_path / "s", ["p01"], {"background": 0, "lesion": 1})
    meta = json.loads((root / "dataset.json").read_text())
    meta["test"] = ["./imagesTs/t01.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(meta))

    site = load_site_dataset(root)

    assert site.label_names == {0: "background", 1: "lesion"}
    assert site.test_images == [str(root / "imagesTs" / "t01.nii.gz")]


def test_pairs_layout_pairs_img_and_seg_files(tmp_path: Path) -> None:
    for case_id in ("b", "a"):
        _write_pair(tmp_path / f"{case_id}_img.nii.gz", tmp_path / f"{case_id}_seg.nii.gz")

    site = load_site_dataset(tmp_path)

    assert site.layout == "pairs"
    assert site.label_names == {0: "background", 1: "lesion"}
    assert site.cases == [
        {
            "image": str(tmp_path / f"{c}_img.nii.gz"),
            "label": str(tmp_path / f"{c}_seg.nii.gz"),
            "case_id": c,
        }
        for c in ("a", "b")
    ]


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"labels": {"0": "bg"}}, 'dataset.json: missing "training" list'),
        ({"training": []}, '"training" is empty'),
        ({"training": [{"image": "./imagesTr/a.nii.gz"}]}, '"training" entry 0 must be'),
        (
            {"training": [{"image": "./a.nii.gz", "label": "./b.nii.gz"}], "labels": {"x": "bg"}},
            '"labels" keys must be integer',
        ),
        (
            {"training": [{"image": "./a.nii.gz", "label": "./b.nii.gz"}], "test": [3]},
            '"test" entries must be paths',
        ),
        (
            {
                "training": [
                    {"image": "./i/a.nii.gz", "label": "./l/a.nii.gz"},
                    {"image": "./j/a.nii.gz", "label": "./l/b.nii.gz"},
                ]
            },
            "case id 'a' appears twice",
        ),
    ],
    ids=[
        "no-training",
        "empty-training",
        "entry-without-label",
        "bad-labels",
        "bad-test",
        "duplicate-id",
    ],
)
def test_malformed_dataset_json_names_the_file_and_the_entry(
    tmp_path: Path, meta: dict, match: str
) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps(meta))

    with pytest.raises(DataError, match=match) as info:
        load_site_dataset(tmp_path, require_files=False)

    assert str(tmp_path / "dataset.json") in str(info.value)


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text('{"training": [\n  {"image": }\n]}')

    with pytest.raises(DataError, match=r"dataset.json: not valid JSON \(line 2, column 13"):
        load_site_dataset(tmp_path)


def test_missing_listed_file_is_named_when_files_are_required(tmp_path: Path) -> None:
    root = _msd_site(tmp_path / "s", ["p01", "p02"])
    (root / "labelsTr" / "p02.nii.gz").unlink()

    with pytest.raises(DataError, match=r"labelsTr/p02.nii.gz: label of case p02 not found"):
        load_site_dataset(root)
    assert len(load_site_dataset(root, require_files=False).cases) == 2


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda p: None, "empty folder"),
        (lambda p: (p / "notes.txt").write_text("x"), "unknown layout"),
        (lambda p: (p / "imagesTr").mkdir(), "dataset.json: not found, but imagesTr/ is there"),
    ],
    ids=["empty", "unknown", "imagesTr-without-json"],
)
def test_folder_without_a_known_layout_is_refused(tmp_path: Path, setup, match: str) -> None:
    setup(tmp_path)

    with pytest.raises(DataError, match=match):
        load_site_dataset(tmp_path)


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere: site data folder not found"):
        load_site_dataset(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("name", "case_id"),
    [
        ("p01.nii.gz", "p01"),
        ("p01_img.nii.gz", "p01"),
        ("p01_seg.nii", "p01"),
        ("lung_003_0000.nii.gz", "lung_003"),
    ],
)
def test_case_id_strips_suffixes(name: str, case_id: str) -> None:
    assert case_id_from_path(Path("x") / name) == case_id


@pytest.mark.parametrize(
    ("case_id", "patient"),
    [
        ("patient_012_scan2", "patient_012"),
        ("patient_012", "patient_012"),
        ("Patient07-followup", "Patient07"),
        ("site-A_patient_003", "site-A_patient_003"),
        ("pat3_t1", "pat3"),
        ("pathology_5", "pathology_5"),
        ("lung_001", "lung_001"),
    ],
)
def test_patient_id_groups_scans_of_one_patient(case_id: str, patient: str) -> None:
    assert patient_id(case_id) == patient


def _cases(ids: list[str]) -> list[dict[str, str]]:
    return [{"image": f"{i}.nii.gz", "label": f"{i}_l.nii.gz", "case_id": i} for i in ids]


def test_split_is_deterministic_and_depends_on_the_seed() -> None:
    cases = _cases([f"case_{i:03d}" for i in range(60)])

    first = split_cases(cases, val_fraction=0.25, seed=3)
    again = split_cases(list(reversed(cases)), val_fraction=0.25, seed=3)
    other = split_cases(cases, val_fraction=0.25, seed=4)

    val_ids = {c["case_id"] for c in first[1]}
    assert val_ids == {c["case_id"] for c in again[1]}
    assert val_ids != {c["case_id"] for c in other[1]}
    assert len(first[0]) + len(first[1]) == 60
    assert 5 <= len(val_ids) <= 25  # about a quarter


def test_adding_cases_never_moves_existing_cases_across() -> None:
    cases = _cases([f"case_{i:03d}" for i in range(40)])
    _, val = split_cases(cases, val_fraction=0.2, seed=0)

    _, val_more = split_cases(cases + _cases([f"new_{i}" for i in range(10)]), seed=0)

    old_ids = {c["case_id"] for c in cases}
    assert {c["case_id"] for c in val_more} & old_ids == {c["case_id"] for c in val}


def test_scans_of_one_patient_stay_on_one_side() -> None:
    cases = _cases([f"patient_{p:02d}_scan{s}" for p in range(30) for s in range(3)])

    train, val = split_cases(cases, val_fraction=0.3, seed=1)

    train_patients = {patient_id(c["case_id"]) for c in train}
    val_patients = {patient_id(c["case_id"]) for c in val}
    assert train_patients.isdisjoint(val_patients)
    assert len(train_patients | val_patients) == 30
    assert len(val) % 3 == 0 and val


def test_small_site_always_gets_both_sides() -> None:
    for seed in range(20):
        train, val = split_cases(_cases(["a", "b"]), val_fraction=0.2, seed=seed)
        assert len(train) == 1 and len(val) == 1
        train, val = split_cases(_cases(["a", "b"]), val_fraction=0.95, seed=seed)
        assert len(train) == 1 and len(val) == 1


def test_zero_val_fraction_keeps_everything_for_training() -> None:
    train, val = split_cases(_cases(["a", "b", "c"]), val_fraction=0.0)

    assert [c["case_id"] for c in train] == ["a", "b", "c"] and val == []


def test_invalid_val_fraction_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"val_fraction must be in \[0, 1\), got 1.5"):
        split_cases(_cases(["a"]), val_fraction=1.5)


def test_io_package_exports_exactly_its_modules_public_names() -> None:
    import fedmed.io
    from fedmed.io import check, folder, header, msd, nifti

    modules = (check, folder, header, msd, nifti)
    expected = {name for module in modules for name in module.__all__}
    assert set(fedmed.io.__all__) == expected
    assert all(hasattr(fedmed.io, name) for name in expected)
