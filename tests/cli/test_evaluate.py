"""``fedmed evaluate``: pairing by name, grid checks, values of crafted cases, csv and json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmed.cli.evaluate import evaluate_folders
from fedmed.cli.main import main
from fedmed.errors import DataError
from fedmed.metrics import image_diagonal_mm

SHAPE = (20, 20, 8)
SPACING = (0.8, 0.8, 2.5)
AFFINE = np.diag([*SPACING, 1.0])
AFFINE[:3, 3] = (-8.0, 12.0, 30.0)
DIAGONAL = image_diagonal_mm(SHAPE, SPACING)


def _write(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.int16 if array.min() < 0 else np.uint8
    nib.save(nib.Nifti1Image(array.astype(dtype), affine), path)
    return path


def _cube(shift: int = 0) -> np.ndarray:
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[6 + shift : 12 + shift, 6:12, 2:6] = 1  # 6 x 6 x 4 = 144 voxels
    return label


EMPTY = np.zeros(SHAPE, dtype=np.uint8)
# case: (prediction, reference)
CASES = {
    "exact": (_cube(), _cube()),
    "shifted": (_cube(2), _cube()),  # overlap 4 x 6 x 4: Dice 2 * 96 / 288
    "missed": (EMPTY, _cube()),
    "spurious": (_cube(), EMPTY),
    "empty": (EMPTY, EMPTY),
}


@pytest.fixture(scope="session")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pred/`` and ``ref/`` with the five crafted cases of CASES, as .nii.gz."""
    root = tmp_path_factory.mktemp("evaluate")
    for case, (pred, ref) in CASES.items():
        _write(root / "pred" / f"{case}.nii.gz", pred)
        _write(root / "ref" / f"{case}.nii.gz", ref)
    return root


@pytest.fixture(scope="session")
def evaluated(crafted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluated")
    code = main(
        ["evaluate", "--pred", str(crafted / "pred"), "--ref", str(crafted / "ref"),
         "--out", str(out), "--nsd-tolerance", "1.0", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    return out


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "cases.csv").open(newline="") as fh:
        return {row["case"]: row for row in csv.DictReader(fh)}


def test_cases_csv_holds_the_values_of_the_crafted_cases(evaluated: Path) -> None:
    rows = _rows(evaluated)
    header = (evaluated / "cases.csv").read_text().splitlines()[0]
    assert header == "case,class,dice,hd95,nsd,rve,missed,spurious,both_empty"
    assert sorted(rows) == sorted(CASES)
    exact, shifted = rows["exact"], rows["shifted"]
    assert [float(exact[k]) for k in ("dice", "hd95", "nsd", "rve")] == [1.0, 0.0, 1.0, 0.0]
    assert float(shifted["dice"]) == pytest.approx(2 / 3)
    assert float(shifted["rve"]) == 0.0
    # the shift is 2 x 0.8 mm: a 1 mm tolerance keeps only part of the surfaces
    assert 0.0 < float(shifted["nsd"]) < 1.0
    assert float(shifted["hd95"]) == pytest.approx(1.6)
    missed, spurious, empty = rows["missed"], rows["spurious"], rows["empty"]
    assert float(missed["hd95"]) == pytest.approx(DIAGONAL)
    assert float(spurious["hd95"]) == pytest.approx(DIAGONAL)
    assert (missed["nsd"], missed["rve"], spurious["rve"]) == ("0.0", "-1.0", "")
    assert (empty["hd95"], empty["nsd"], empty["dice"]) == ("", "", "1.0")
    flags = {c: (r["missed"], r["spurious"], r["both_empty"]) for c, r in rows.items()}
    assert flags == {
        "exact": ("0", "0", "0"),
        "shifted": ("0", "0", "0"),
        "missed": ("1", "0", "0"),
        "spurious": ("0", "1", "0"),
        "empty": ("0", "0", "1"),
    }
    assert {r["class"] for r in rows.values()} == {"1"}


def test_summary_json_carries_counts_means_and_intervals(evaluated: Path) -> None:
    summary = json.loads((evaluated / "summary.json").read_text())
    assert (summary["n_cases"], summary["n_missed"], summary["n_spurious"]) == (5, 1, 1)
    assert summary["n_both_empty"] == 1
    assert summary["labels"] == [1] and summary["nsd_tolerance_mm"] == 1.0
    one = summary["classes"]["1"]
    assert one["dice"] == pytest.approx((1 + 2 / 3 + 0 + 0 + 1) / 5) and one["dice_n"] == 5
    assert one["hd95"] == pytest.approx((0 + 1.6 + 2 * DIAGONAL) / 4) and one["hd95_n"] == 4
    assert one["rve_n"] == 4 and (one["n_missed"], one["n_both_empty"]) == (1, 1)
    hd = one["stats"]["hd95"]
    assert (hd["n"], hd["n_undefined"], hd["status"]) == (4, 1, "ok")
    assert hd["ci_low"] <= hd["mean"] <= hd["ci_high"]
    assert hd["worst_decile"] == pytest.approx(DIAGONAL)
    assert set(one["stats"]) == {"dice", "hd95", "nsd", "abs_rve"}
    assert summary["mean_over_classes"]["dice"] == pytest.approx(one["dice"])


def test_disclosure_floor_withholds_values(crafted: Path, tmp_path: Path) -> None:
    code = main(
        ["evaluate", "--pred", str(crafted / "pred"), "--ref", str(crafted / "ref"),
         "--out", str(tmp_path), "--disclosure-floor", "5", "--no-progress"]
    )  # fmt: skip
    stats = json.loads((tmp_path / "summary.json").read_text())["classes"]["1"]["stats"]
    assert code == 0
    assert stats["dice"]["status"] == "ok"
    assert stats["hd95"] == {"n": 4, "n_undefined": 1, "status": "too few cases"}


def test_a_reference_without_prediction_is_an_error_naming_it(tmp_path: Path) -> None:
    _write(tmp_path / "ref" / "a.nii.gz", _cube())
    _write(tmp_path / "ref" / "b.nii.gz", _cube())
    _write(tmp_path / "pred" / "a.nii.gz", _cube())
    with pytest.raises(DataError, match=r"reference .*ref/b\.nii\.gz has no prediction named "):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")


def test_a_prediction_without_reference_exits_4_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "ref" / "a.nii.gz", _cube())
    _write(tmp_path / "pred" / "a.nii.gz", _cube())
    _write(tmp_path / "pred" / "a_pred.nii.gz", _cube())
    code = main(
        ["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
         "--out", str(tmp_path / "out")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 4
    assert f"prediction {tmp_path / 'pred' / 'a_pred.nii.gz'} has no reference" in err
    assert f"in {tmp_path / 'ref'}" in err
    assert not (tmp_path / "out").exists()


def test_names_must_match_exactly_including_the_suffix(tmp_path: Path) -> None:
    _write(tmp_path / "ref" / "a.nii.gz", _cube())
    _write(tmp_path / "pred" / "a.nii", _cube())
    with pytest.raises(DataError, match=r"\(a\.nii is there: names must match exactly\)"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")


def test_a_shape_mismatch_names_both_files(tmp_path: Path) -> None:
    pred = _write(tmp_path / "pred" / "a.nii.gz", np.zeros((20, 20, 9), dtype=np.uint8))
    ref = _write(tmp_path / "ref" / "a.nii.gz", _cube())
    with pytest.raises(DataError, match="has shape") as info:
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert str(pred) in str(info.value) and str(ref) in str(info.value)
    assert "(20, 20, 9)" in str(info.value) and "(20, 20, 8)" in str(info.value)


def test_an_affine_mismatch_names_both_files(tmp_path: Path) -> None:
    moved = AFFINE.copy()
    moved[0, 3] += 0.5
    pred = _write(tmp_path / "pred" / "a.nii.gz", _cube(), moved)
    ref = _write(tmp_path / "ref" / "a.nii.gz", _cube())
    with pytest.raises(DataError, match=r"affines differing by 0\.5 mm") as info:
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert str(pred) in str(info.value) and str(ref) in str(info.value)
    # within a loose tolerance the pair is scored
    assert len(evaluate_folders(tmp_path / "pred", tmp_path / "ref", affine_atol=1.0)) == 1


def test_an_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "pred").mkdir()
    _write(tmp_path / "ref" / "a.nii.gz", _cube())
    with pytest.raises(DataError, match=r"--pred .* holds no NIfTI file"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")


def test_a_label_value_beyond_num_classes_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "pred" / "a.nii.gz", _cube())
    _write(tmp_path / "ref" / "a.nii.gz", _cube() * 2)
    with pytest.raises(DataError, match=r"label value 2 is outside 0\.\.1: pass --num-classes 3"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    _write(tmp_path / "ref" / "a.nii.gz", _cube().astype(np.int16) - 1)
    with pytest.raises(DataError, match="label value -1 is negative: give label maps, not images"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")


def test_labels_pick_the_classes_scored(tmp_path: Path) -> None:
    # Prepare: class 1 exact, class 2 missed
    ref = _cube() + np.roll(_cube(), 8, axis=1) * 2
    pred = _cube()
    _write(tmp_path / "pred" / "a.nii.gz", pred)
    _write(tmp_path / "ref" / "a.nii.gz", ref)
    # Execute
    code = main(
        ["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
         "--out", str(tmp_path / "out"), "--labels", "2", "--no-progress"]
    )  # fmt: skip
    # Assert
    with (tmp_path / "out" / "cases.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert code == 0
    assert [(r["case"], r["class"], r["missed"]) for r in rows] == [("a", "2", "1")]
    assert set(summary["classes"]) == {"2"} and summary["n_missed"] == 1
    assert float(rows[0]["hd95"]) == pytest.approx(DIAGONAL)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", "1,x"], "--labels '1,x' must be integers"),
        (["--labels", "2", "--num-classes", "2"], "--labels '2' must lie in 1..1"),
        (["--num-classes", "1"], "--num-classes must be >= 2"),
        (["--nsd-tolerance", "-1"], "--nsd-tolerance must be >= 0 mm"),
        (["--disclosure-floor", "0"], "--disclosure-floor must be >= 1"),
    ],
    ids=["labels-not-int", "labels-range", "num-classes", "tolerance", "floor"],
)
def test_bad_options_exit_3_with_the_setting_named(
    crafted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra, message
) -> None:
    code = main(
        ["evaluate", "--pred", str(crafted / "pred"), "--ref", str(crafted / "ref"),
         "--out", str(tmp_path), *extra]
    )  # fmt: skip
    assert code == 3
    assert message in capsys.readouterr().err


def test_float_label_files_must_hold_whole_numbers(tmp_path: Path) -> None:
    _write(tmp_path / "pred" / "a.nii.gz", _cube())
    ref = tmp_path / "ref" / "a.nii.gz"
    ref.parent.mkdir()
    nib.save(nib.Nifti1Image(_cube().astype(np.float32), AFFINE), ref)
    assert evaluate_folders(tmp_path / "pred", tmp_path / "ref")[0]["dice_1"] == 1.0
    nib.save(nib.Nifti1Image(_cube().astype(np.float32) * 0.5, AFFINE), ref)
    with pytest.raises(DataError, match="label values must be integers, the file holds fractions"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
