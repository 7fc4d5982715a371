"""Dice, HD95, NSD and RVE cross-checked against MONAI, their documented edge cases (worst-case
surface distances for missed and spurious structures), flags and counted summaries."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

from fedmed.metrics import (
    dice_per_class,
    dice_score,
    evaluate_case,
    hd95,
    hd95_per_class,
    image_diagonal_mm,
    normalized_surface_dice,
    nsd_per_class,
    relative_volume_error,
    rve_per_class,
)
from fedmed.summary import combine_classes, summarize


def _blobs(shape: tuple[int, ...], num_classes: int, seed: int) -> np.ndarray:
    """Smooth random label map in which every class 1..num_classes-1 covers some voxels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int64)
    for c in range(1, num_classes):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
        labels[field > np.quantile(field, 0.75)] = c
    assert all((labels == c).any() for c in range(num_classes))
    return labels


def _monai_onehot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(labels, dtype=torch.long)
    return torch.nn.functional.one_hot(t, num_classes).movedim(-1, 0)[None].float()


def _monai_hd95(pred: np.ndarray, label: np.ndarray, num_classes: int, spacing) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compute_hausdorff_distance(
            _monai_onehot(pred, num_classes),
            _monai_onehot(label, num_classes),
            include_background=False,
            percentile=95,
            spacing=spacing,
        )
    return out[0].numpy()


CASES = {
    "2d-iso": ((40, 36), None),
    "2d-aniso": ((40, 36), (0.7, 2.5)),
    "3d-iso": ((20, 18, 12), (1.0, 1.0, 1.0)),
    "3d-aniso": ((20, 18, 12), (0.8, 0.8, 5.0)),
}


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_dice_matches_monai_on_random_cases(case: str, seed: int) -> None:
    shape, _ = CASES[case]
    pred, label = _blobs(shape, 3, seed), _blobs(shape, 3, seed + 100)
    ours = dice_per_class(pred, label, num_classes=3)
    ref = compute_dice(_monai_onehot(pred, 3), _monai_onehot(label, 3), include_background=False)
    np.testing.assert_allclose(ours, ref[0].numpy(), rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_hd95_matches_monai_on_random_cases(case: str, seed: int) -> None:
    shape, spacing = CASES[case]
    pred, label = _blobs(shape, 3, seed), _blobs(shape, 3, seed + 100)
    ours = hd95_per_class(pred, label, num_classes=3, spacing=spacing)
    ref = _monai_hd95(pred, label, 3, spacing)
    assert np.isfinite(ours).all() and (ours > 0).all()
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def _masks(kind: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    full = np.zeros(shape, dtype=np.int64)
    blob = full.copy()
    blob[tuple(slice(2, 6) for _ in shape)] = 1
    single = full.copy()
    single[(7,) * len(shape)] = 1
    return {
        "empty-pred": (full, blob),
        "empty-label": (blob, full),
        "both-empty": (full, full),
        "single-voxel-pred": (single, blob),
        "single-voxels": (single, np.roll(single, 2, axis=0)),
        "identical": (blob, blob),
    }[kind]


EDGE = [
    "empty-pred",
    "empty-label",
    "both-empty",
    "single-voxel-pred",
    "single-voxels",
    "identical",
]


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", EDGE)
@pytest.mark.parametrize("ignore_empty", [False, True], ids=["count-empty", "ignore-empty"])
def test_dice_edge_cases_match_monai(ndim: int, kind: str, ignore_empty: bool) -> None:
    pred, label = _masks(kind, (10,) * ndim)
    ours = dice_per_class(pred, label, num_classes=2, ignore_empty=ignore_empty)
    ref = compute_dice(
        _monai_onehot(pred, 2),
        _monai_onehot(label, 2),
        include_background=False,
        ignore_empty=ignore_empty,
    )
    np.testing.assert_allclose(ours, ref[0].numpy(), rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", EDGE)
def test_hd95_edge_cases_match_monai_unless_exactly_one_mask_is_empty(ndim: int, kind: str) -> None:
    pred, label = _masks(kind, (10,) * ndim)
    spacing = (0.5, 2.0, 3.0)[:ndim]
    ours = hd95_per_class(pred, label, num_classes=2, spacing=spacing)
    if kind in ("empty-pred", "empty-label"):  # fedmed departs: worst case, not nan
        diagonal = math.sqrt(sum((10 * s) ** 2 for s in spacing))
        np.testing.assert_allclose(ours, [diagonal])
    else:
        np.testing.assert_allclose(ours, _monai_hd95(pred, label, 2, spacing), equal_nan=True)


def _monai_nsd(pred, label, num_classes: int, spacing, tolerance: float) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compute_surface_dice(
            _monai_onehot(pred, num_classes),
            _monai_onehot(label, num_classes),
            [tolerance] * (num_classes - 1),
            include_background=False,
            spacing=spacing,
            use_subvoxels=False,
        )
    return out[0].numpy()


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.5])
def test_nsd_matches_monai_on_random_cases(case: str, tolerance: float) -> None:
    shape, spacing = CASES[case]
    pred, label = _blobs(shape, 3, 3), _blobs(shape, 3, 103)
    ours = nsd_per_class(pred, label, num_classes=3, spacing=spacing, tolerance_mm=tolerance)
    ref = _monai_nsd(pred, label, 3, spacing or (1.0,) * len(shape), tolerance)
    assert ((ours > 0) & (ours < 1)).all()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", EDGE)
def test_nsd_edge_cases_match_monai(ndim: int, kind: str) -> None:
    pred, label = _masks(kind, (10,) * ndim)
    spacing = (0.5, 2.0, 3.0)[:ndim]
    ours = nsd_per_class(pred, label, num_classes=2, spacing=spacing, tolerance_mm=1.0)
    np.testing.assert_allclose(ours, _monai_nsd(pred, label, 2, spacing, 1.0), equal_nan=True)


def test_documented_edge_case_values() -> None:
    diagonal = math.hypot(8 * 0.5, 8 * 2.0)
    pred, label = _masks("both-empty", (8, 8))
    m = evaluate_case(pred, label, num_classes=2, spacing=(0.5, 2.0))
    assert m["dice_1"] == 1.0 and m["rve_1"] == 0.0
    assert math.isnan(m["hd95_1"]) and math.isnan(m["nsd_1"])
    assert math.isnan(dice_score(pred, label, ignore_empty=True))
    assert (m["missed_1"], m["spurious_1"], m["both_empty_1"]) == (False, False, True)
    pred, label = _masks("empty-pred", (8, 8))
    m = evaluate_case(pred, label, num_classes=2, spacing=(0.5, 2.0))
    assert (m["dice_1"], m["nsd_1"], m["rve_1"]) == (0.0, 0.0, -1.0)
    assert m["hd95_1"] == pytest.approx(diagonal)
    assert (m["missed_1"], m["spurious_1"], m["both_empty_1"]) == (True, False, False)
    pred, label = _masks("empty-label", (8, 8))
    m = evaluate_case(pred, label, num_classes=2, spacing=(0.5, 2.0))
    assert (m["dice_1"], m["nsd_1"]) == (0.0, 0.0) and math.isnan(m["rve_1"])
    assert m["hd95_1"] == pytest.approx(diagonal)
    assert (m["missed_1"], m["spurious_1"], m["both_empty_1"]) == (False, True, False)
    assert image_diagonal_mm((8, 8), (0.5, 2.0)) == pytest.approx(diagonal)


def test_evaluate_case_agrees_with_the_single_metric_functions() -> None:
    pred, label = _blobs((20, 18, 12), 3, 21), _blobs((20, 18, 12), 3, 22)
    spacing = (0.8, 0.8, 5.0)
    m = evaluate_case(pred, label, num_classes=3, spacing=spacing, nsd_tolerance_mm=3.0)
    for c in (1, 2):
        p, g = pred == c, label == c
        assert m[f"dice_{c}"] == dice_score(p, g)
        assert m[f"hd95_{c}"] == hd95(p, g, spacing=spacing)
        assert m[f"nsd_{c}"] == normalized_surface_dice(p, g, spacing=spacing, tolerance_mm=3.0)
        assert m[f"rve_{c}"] == relative_volume_error(p, g)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.6, 0.9, 4.0)], ids=str)
def test_hd95_equals_the_distance_transform_definition(spacing: tuple[float, ...]) -> None:
    pred, label = _blobs((18, 16, 10), 2, 11) == 1, _blobs((18, 16, 10), 2, 12) == 1
    p_surface = pred ^ ndimage.binary_erosion(pred)
    g_surface = label ^ ndimage.binary_erosion(label)
    to_label = ndimage.distance_transform_edt(~g_surface, sampling=spacing)[p_surface]
    to_pred = ndimage.distance_transform_edt(~p_surface, sampling=spacing)[g_surface]
    expected = max(np.percentile(to_label, 95), np.percentile(to_pred, 95))
    assert hd95(pred, label, spacing=spacing) == pytest.approx(expected, rel=1e-12)


def test_hd95_of_two_single_voxels_is_their_distance_in_mm() -> None:
    pred = np.zeros((6, 6, 6), dtype=bool)
    label = pred.copy()
    pred[1, 1, 1] = True
    label[4, 1, 3] = True
    expected = math.hypot(3 * 0.7, 2 * 2.5)
    assert hd95(pred, label, spacing=(0.7, 1.0, 2.5)) == pytest.approx(expected)


def test_hd95_uses_the_95th_percentile_not_the_maximum() -> None:
    # A 1-voxel-wide line of 40 voxels vs the same line plus one far outlier voxel.
    label = np.zeros((60, 5), dtype=bool)
    label[:40, 2] = True
    pred = label.copy()
    pred[59, 2] = True
    # pred -> label distances: 40 zeros and 20 (the outlier); label -> pred: all zero.
    expected = np.percentile(np.r_[np.zeros(40), 20.0], 95)
    assert hd95(pred, label) == pytest.approx(expected)
    assert hd95(pred, label, percentile=100) == pytest.approx(20.0)


def test_rve_values() -> None:
    label = np.zeros((10, 10), dtype=np.int64)
    label[:4, :5] = 1  # 20 voxels of class 1
    label[6:, 6:] = 2  # 16 voxels of class 2
    pred = np.zeros_like(label)
    pred[:5, :6] = 1  # 30 voxels: +50 %
    pred[6:8, 6:10] = 2  # 8 voxels: -50 %
    np.testing.assert_allclose(rve_per_class(pred, label, num_classes=3), [0.5, -0.5])


def test_onehot_and_label_map_inputs_agree_and_tensors_are_accepted() -> None:
    pred, label = _blobs((16, 16, 8), 3, 5), _blobs((16, 16, 8), 3, 6)
    onehot_pred = _monai_onehot(pred, 3)[0].bool().numpy()
    onehot_label = _monai_onehot(label, 3)[0].bool().numpy()
    from_maps = evaluate_case(pred, label, num_classes=3, spacing=(1.0, 1.0, 2.0))
    from_onehot = evaluate_case(
        onehot_pred, onehot_label, num_classes=3, spacing=(1.0, 1.0, 2.0), onehot=True
    )
    from_tensors = evaluate_case(
        torch.as_tensor(pred), torch.as_tensor(label), num_classes=3, spacing=(1.0, 1.0, 2.0)
    )
    assert from_maps == from_onehot == from_tensors
    names = ("dice", "hd95", "nsd", "rve", "missed", "spurious", "both_empty")
    assert set(from_maps) == {f"{n}_{c}" for n in names for c in (1, 2)}


def test_include_background_adds_class_0() -> None:
    pred, label = _blobs((12, 12), 2, 7), _blobs((12, 12), 2, 8)
    values = dice_per_class(pred, label, num_classes=2, include_background=True)
    assert values.shape == (2,)
    assert values[0] == pytest.approx(dice_score(pred == 0, label == 0))


def test_summarize_means_defined_values_and_counts_them() -> None:
    per_case = [
        {"case": "a", "dice_1": 0.5, "hd95_1": 2.0, "both_empty_1": False},
        {"case": "b", "dice_1": 1.0, "hd95_1": math.nan, "both_empty_1": True},
        {"case": "c", "dice_1": 0.0, "hd95_1": math.nan, "both_empty_1": True},
    ]
    out = summarize(per_case)
    assert out["dice_1"] == pytest.approx(0.5)
    assert out["hd95_1"] == pytest.approx(2.0)
    assert (out["dice_1_n"], out["hd95_1_n"], out["n_cases"]) == (3, 1, 3)
    assert (out["n_both_empty_1"], out["n_both_empty"], out["n_missed"]) == (2, 2, 0)
    assert "case" not in out
    all_nan = summarize([{"hd95_1": math.nan}])
    assert math.isnan(all_nan["hd95_1"]) and all_nan["hd95_1_n"] == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spacing": (1.0, 0.0)}, "spacing must be 2 positive numbers"),
        ({"spacing": (1.0, 1.0, 1.0)}, "spacing must be 2 positive numbers"),
        ({"percentile": 120}, r"percentile must be in \[0, 100\]"),
    ],
    ids=["zero-spacing", "wrong-length", "percentile"],
)
def test_hd95_rejects_bad_options(kwargs: dict, match: str) -> None:
    pred, label = _masks("identical", (10, 10))
    with pytest.raises(ValueError, match=match):
        hd95(pred, label, **kwargs)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="differs from label shape"):
        dice_per_class(np.zeros((4, 4)), np.zeros((4, 5)), num_classes=2)


def test_public_api_is_pinned() -> None:
    import fedmed.metrics as module

    assert sorted(module.__all__) == [
        "DEFAULT_NSD_TOLERANCE_MM",
        "FLAGS",
        "METRICS",
        "dice_per_class",
        "dice_score",
        "evaluate_case",
        "hd95",
        "hd95_per_class",
        "image_diagonal_mm",
        "normalized_surface_dice",
        "nsd_per_class",
        "relative_volume_error",
        "rve_per_class",
    ]
    assert all(hasattr(module, name) for name in module.__all__)
    import fedmed.summary as summary

    assert sorted(summary.__all__) == ["combine_classes", "summarize"]
    assert all(hasattr(summary, name) for name in summary.__all__)


# --- worst-case surface distances, NSD on a geometry computed by hand, counted summaries ---


def _cube(shape: tuple[int, ...], start: int, n: int) -> np.ndarray:
    """A 3D cube of side ``n`` starting at ``start`` along axis 0 and at 1 laterally."""
    mask = np.zeros(shape, dtype=bool)
    mask[start : start + n, 1 : 1 + n, 1 : 1 + n] = True
    return mask


# Two 6-voxel cubes offset by k = 2 voxels along axis 0 (0.5 mm), lateral spacing 3 mm. Each
# surface has 152 voxels: per axis-0 layer a 20-voxel ring, plus 16 interior voxels at each end.
# From one cube's surface to the other's: the 80 ring voxels of the 4 shared layers are at 0,
# the 20 ring voxels one layer out at 0.5 mm, the 20 ring voxels of the outer layer and the 32
# end-face interior voxels at k * 0.5 = 1.0 mm (the lateral way out is at least 3 mm).
CUBES_SPACING = (0.5, 3.0, 3.0)


@pytest.mark.parametrize(
    ("tolerance", "expected"),
    [(0.0, 80 / 152), (0.25, 80 / 152), (0.5, 100 / 152), (0.75, 100 / 152), (1.0, 1.0)],
    ids=["zero", "below-one-layer", "one-layer", "below-offset", "at-offset"],
)
def test_nsd_of_offset_cubes_equals_the_hand_count(tolerance: float, expected: float) -> None:
    pred, label = _cube((12, 8, 8), 2, 6), _cube((12, 8, 8), 4, 6)
    nsd = normalized_surface_dice(pred, label, spacing=CUBES_SPACING, tolerance_mm=tolerance)
    assert nsd == pytest.approx(expected, abs=1e-12)
    assert hd95(pred, label, spacing=CUBES_SPACING) == pytest.approx(1.0)


def test_nsd_with_unbounded_tolerance_is_one_and_identical_masks_score_one() -> None:
    pred, label = _blobs((20, 18, 12), 2, 31) == 1, _blobs((20, 18, 12), 2, 32) == 1
    assert normalized_surface_dice(pred, label, spacing=(1, 1, 4), tolerance_mm=math.inf) == 1.0
    assert normalized_surface_dice(pred, label, spacing=(1, 1, 4), tolerance_mm=0.5) < 1.0
    assert normalized_surface_dice(label, label, tolerance_mm=0.0) == 1.0


def _lesion_case(shape: tuple[int, int, int], shift: int) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros(shape, dtype=np.int64)
    label[4:10, 4:10, 2:6] = 1
    return np.roll(label, shift, axis=0), label


def test_a_missed_lesion_makes_mean_hd95_worse_than_a_rough_prediction() -> None:
    # Prepare: one well-predicted case; the second either roughly predicted or missed
    spacing = (1.0, 1.0, 3.0)
    good = _lesion_case((24, 24, 8), 0)
    rough = _lesion_case((24, 24, 8), 3)
    missed = (np.zeros_like(rough[1]), rough[1])
    # Execute
    with_rough = summarize(
        [evaluate_case(*c, num_classes=2, spacing=spacing) for c in (good, rough)]
    )
    with_miss = summarize(
        [evaluate_case(*c, num_classes=2, spacing=spacing) for c in (good, missed)]
    )
    # Assert: the miss scores the diagonal and is counted, so predicting nothing never wins
    diagonal = image_diagonal_mm((24, 24, 8), spacing)
    assert with_miss["hd95_1"] == pytest.approx((0.0 + diagonal) / 2)
    assert with_miss["hd95_1"] > with_rough["hd95_1"]
    assert with_miss["nsd_1"] < with_rough["nsd_1"]
    assert (with_miss["hd95_1_n"], with_miss["n_cases"], with_miss["n_missed"]) == (2, 2, 1)
    assert with_rough["n_missed"] == 0


def test_a_spurious_prediction_scores_the_diagonal_and_is_counted() -> None:
    spacing = (1.0, 1.0, 3.0)
    pred, _ = _lesion_case((24, 24, 8), 0)
    empty = np.zeros_like(pred)
    out = summarize([evaluate_case(pred, empty, num_classes=2, spacing=spacing)])
    assert out["hd95_1"] == pytest.approx(image_diagonal_mm((24, 24, 8), spacing))
    assert (out["nsd_1"], out["dice_1"]) == (0.0, 0.0)
    assert math.isnan(out["rve_1"]) and out["rve_1_n"] == 0
    assert (out["n_spurious"], out["n_missed"], out["n_both_empty"]) == (1, 0, 0)


def test_both_empty_cases_are_counted_apart_and_left_out_of_surface_means() -> None:
    spacing = (1.0, 1.0, 3.0)
    good = _lesion_case((24, 24, 8), 1)
    empty = np.zeros((24, 24, 8), dtype=np.int64)
    alone = summarize([evaluate_case(*good, num_classes=2, spacing=spacing)])
    both = summarize(
        [evaluate_case(*c, num_classes=2, spacing=spacing) for c in (good, (empty, empty))]
    )
    assert both["hd95_1"] == alone["hd95_1"] and both["nsd_1"] == alone["nsd_1"]
    assert (both["hd95_1_n"], both["nsd_1_n"], both["dice_1_n"], both["n_cases"]) == (1, 1, 2, 2)
    assert (both["n_both_empty"], both["n_both_empty_1"], both["n_missed"]) == (1, 1, 0)


def test_combine_classes_means_defined_values_and_counts_flags() -> None:
    # Prepare: class 1 predicted exactly, class 2 missed, class 3 absent from both
    label = np.zeros((16, 16, 6), dtype=np.int64)
    label[2:6, 2:6, 1:4] = 1
    label[9:13, 9:13, 1:4] = 2
    pred = np.where(label == 1, 1, 0)
    m = evaluate_case(pred, label, num_classes=4, spacing=(1.0, 1.0, 2.0))
    # Execute
    record = combine_classes(m, [1, 2, 3])
    kept = combine_classes(m, [1, 2, 3], keep_classes=True)
    # Assert
    diagonal = image_diagonal_mm((16, 16, 6), (1.0, 1.0, 2.0))
    assert record["dice"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    assert record["hd95"] == pytest.approx(diagonal / 2)  # class 3 is both-empty: left out
    assert record["nsd"] == pytest.approx(0.5)
    assert (record["missed"], record["spurious"], record["both_empty"]) == (1, 0, 1)
    assert kept["missed_2"] is True and kept["hd95_2"] == pytest.approx(diagonal)
    assert summarize([kept, kept])["n_missed"] == 2


def test_evaluate_case_classes_picks_the_classes_evaluated() -> None:
    pred, label = _blobs((12, 12, 4), 3, 41), _blobs((12, 12, 4), 3, 42)
    m = evaluate_case(pred, label, num_classes=3, classes=[2])
    assert sorted(m) == sorted(f"{n}_2" for n in (*("dice", "hd95", "nsd", "rve"), *FLAG_NAMES))
    with pytest.raises(ValueError, match=r"classes \[3\] must lie in 0\.\.2"):
        evaluate_case(pred, label, num_classes=3, classes=[3])


FLAG_NAMES = ("missed", "spurious", "both_empty")


@pytest.mark.parametrize("tolerance", [-1.0, math.nan], ids=["negative", "nan"])
def test_nsd_rejects_a_bad_tolerance(tolerance: float) -> None:
    pred, label = _masks("identical", (10, 10))
    with pytest.raises(ValueError, match="NSD tolerance must be >= 0 mm"):
        normalized_surface_dice(pred, label, tolerance_mm=tolerance)
    with pytest.raises(ValueError, match="NSD tolerance must be >= 0 mm"):
        evaluate_case(pred, label, num_classes=2, nsd_tolerance_mm=tolerance)
