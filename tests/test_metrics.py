"""Dice, HD95 and RVE cross-checked against MONAI, and their documented edge cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage

from fedmed.metrics import (
    dice_per_class,
    dice_score,
    evaluate_case,
    hd95,
    hd95_per_class,
    relative_volume_error,
    rve_per_class,
    summarize,
)


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
def test_hd95_edge_cases_match_monai(ndim: int, kind: str) -> None:
    pred, label = _masks(kind, (10,) * ndim)
    spacing = (0.5, 2.0, 3.0)[:ndim]
    ours = hd95_per_class(pred, label, num_classes=2, spacing=spacing)
    np.testing.assert_allclose(ours, _monai_hd95(pred, label, 2, spacing), equal_nan=True)


def test_documented_edge_case_values() -> None:
    pred, label = _masks("both-empty", (8, 8))
    assert dice_score(pred, label) == 1.0
    assert math.isnan(dice_score(pred, label, ignore_empty=True))
    assert math.isnan(hd95(pred, label))
    assert relative_volume_error(pred, label) == 0.0
    pred, label = _masks("empty-pred", (8, 8))
    assert dice_score(pred, label) == 0.0
    assert math.isnan(hd95(pred, label))
    assert relative_volume_error(pred, label) == -1.0
    pred, label = _masks("empty-label", (8, 8))
    assert dice_score(pred, label) == 0.0
    assert math.isnan(relative_volume_error(pred, label))


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
    assert set(from_maps) == {"dice_1", "hd95_1", "rve_1", "dice_2", "hd95_2", "rve_2"}


def test_include_background_adds_class_0() -> None:
    pred, label = _blobs((12, 12), 2, 7), _blobs((12, 12), 2, 8)
    values = dice_per_class(pred, label, num_classes=2, include_background=True)
    assert values.shape == (2,)
    assert values[0] == pytest.approx(dice_score(pred == 0, label == 0))


def test_summarize_skips_nan_and_counts_values() -> None:
    per_case = [
        {"dice_1": 0.5, "hd95_1": 2.0},
        {"dice_1": 1.0, "hd95_1": math.nan},
        {"dice_1": 0.0, "hd95_1": math.nan},
    ]
    out = summarize(per_case)
    assert out["dice_1"] == pytest.approx(0.5)
    assert out["hd95_1"] == pytest.approx(2.0)
    assert (out["dice_1_n"], out["hd95_1_n"], out["num_cases"]) == (3, 1, 3)
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
        "dice_per_class",
        "dice_score",
        "evaluate_case",
        "hd95",
        "hd95_per_class",
        "relative_volume_error",
        "rve_per_class",
        "summarize",
    ]
    assert all(hasattr(module, name) for name in module.__all__)
