"""Segmentation metrics per case: Dice, 95% Hausdorff distance (mm), relative volume error.

Inputs are one case at a time: integer label maps of the same spatial shape (numpy arrays or
tensors of any device), or one-hot / boolean maps ``(C, *spatial)`` with ``onehot=True``.
Per-class functions return one value per class, background (class 0) left out unless
``include_background=True``.

Edge cases, chosen to agree with MONAI 1.6 (``compute_dice``, ``compute_hausdorff_distance``):

=========================  =========================  =========================  ===============
case                       Dice                       HD95                       RVE
=========================  =========================  =========================  ===============
label and prediction       2|P∩L| / (|P| + |L|)       symmetric 95th percentile  (|P|-|L|)/|L|
label empty, pred empty    1.0 (nan if ignore_empty)  nan                        0.0
label empty, pred not      0.0 (nan if ignore_empty)  nan                        nan
pred empty, label not      0.0                        nan                        -1.0
=========================  =========================  =========================  ===============

Dice's default ``ignore_empty=False`` counts a correctly empty prediction as perfect, like
MONAI's ``compute_dice(..., ignore_empty=False)``; MONAI's own default (``True``) gives nan
instead and drops the case from means. HD95 is nan whenever either mask is empty, exactly as
MONAI returns it with ``percentile=95``; ``summarize`` skips nan, so a missed lesion shows in
Dice (0.0) and not in the mean HD95.

HD95 follows MONAI's construction: the surface of a mask is the mask minus its binary erosion
(face connectivity, outside the array counts as background); distances from every surface
voxel of one mask to the nearest surface voxel of the other are Euclidean in mm, the values
``scipy.ndimage.distance_transform_edt(~surface, sampling=spacing)`` gives, computed with a
KD-tree over the surface voxels' mm coordinates (as MONAI does on CPU; about 2x faster than the
dense transform on a 256x256x64 volume); HD95 is the larger of the two directed 95th
percentiles (linear interpolation).

Example:
    >>> per_case = [evaluate_case(pred, label, num_classes=2, spacing=(0.7, 0.7, 5.0))]
    >>> summarize(per_case)["dice_1"]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = [
    "dice_per_class",
    "dice_score",
    "evaluate_case",
    "hd95",
    "hd95_per_class",
    "relative_volume_error",
    "rve_per_class",
    "summarize",
]

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _class_masks(
    pred: ArrayLike,
    label: ArrayLike,
    *,
    num_classes: int,
    include_background: bool,
    onehot: bool,
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``[(class, pred_mask, label_mask)]`` as boolean arrays for the classes evaluated."""
    p, g = _to_numpy(pred), _to_numpy(label)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from label shape {g.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + classes), got {num_classes}")
    if onehot and p.shape[0] != num_classes:
        raise ValueError(
            f"one-hot input has {p.shape[0]} channels but num_classes is {num_classes}"
        )
    first = 0 if include_background else 1
    if onehot:
        return [(c, p[c].astype(bool), g[c].astype(bool)) for c in range(first, num_classes)]
    return [(c, p == c, g == c) for c in range(first, num_classes)]


def dice_score(pred: ArrayLike, label: ArrayLike, *, ignore_empty: bool = False) -> float:
    """Dice of two boolean masks; an empty label gives 1.0/0.0 (or nan if ``ignore_empty``)."""
    p, g = _to_numpy(pred).astype(bool), _to_numpy(label).astype(bool)
    label_size, pred_size = int(g.sum()), int(p.sum())
    if label_size == 0:
        if ignore_empty:
            return math.nan
        return 1.0 if pred_size == 0 else 0.0
    return 2.0 * int(np.logical_and(p, g).sum()) / (label_size + pred_size)


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, (int, float)):
        values = (float(spacing),) * ndim
    else:
        values = tuple(float(s) for s in spacing)
    if len(values) != ndim or any(not s > 0 for s in values):
        raise ValueError(f"spacing must be {ndim} positive numbers (mm), got {spacing!r}")
    return values


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask)


def hd95(
    pred: ArrayLike,
    label: ArrayLike,
    *,
    spacing: float | Sequence[float] | None = None,
    percentile: float = 95.0,
) -> float:
    """Symmetric percentile Hausdorff distance (mm) of two boolean masks; nan if one is empty."""
    p, g = _to_numpy(pred).astype(bool), _to_numpy(label).astype(bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from label shape {g.shape}")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    sampling = _spacing(spacing, p.ndim)
    if not p.any() or not g.any():
        return math.nan
    # Outside the union's bounding box both masks are background, so erosion (which treats
    # the outside as background) gives the same surfaces on the box alone.
    box = ndimage.find_objects((p | g).astype(np.uint8))[0]
    scale = np.asarray(sampling)
    p_points = np.argwhere(_surface(p[box])) * scale
    g_points = np.argwhere(_surface(g[box])) * scale
    to_label = cKDTree(g_points).query(p_points, k=1)[0]
    to_pred = cKDTree(p_points).query(g_points, k=1)[0]
    return float(max(np.percentile(to_label, percentile), np.percentile(to_pred, percentile)))


def relative_volume_error(pred: ArrayLike, label: ArrayLike) -> float:
    """Signed ``(|P| - |L|) / |L|``; 0.0 if both are empty, nan if only the label is."""
    pred_size = int(_to_numpy(pred).astype(bool).sum())
    label_size = int(_to_numpy(label).astype(bool).sum())
    if label_size == 0:
        return 0.0 if pred_size == 0 else math.nan
    return (pred_size - label_size) / label_size


def dice_per_class(
    pred: ArrayLike,
    label: ArrayLike,
    *,
    num_classes: int,
    include_background: bool = False,
    ignore_empty: bool = False,
    onehot: bool = False,
) -> np.ndarray:
    """Dice of each class of one case, shape ``(num_classes - 1,)`` without background."""
    masks = _class_masks(
        pred, label, num_classes=num_classes, include_background=include_background, onehot=onehot
    )
    return np.array([dice_score(p, g, ignore_empty=ignore_empty) for _, p, g in masks])


def hd95_per_class(
    pred: ArrayLike,
    label: ArrayLike,
    *,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    include_background: bool = False,
    onehot: bool = False,
    percentile: float = 95.0,
) -> np.ndarray:
    """HD95 (mm) of each class of one case; ``spacing`` is the voxel size along each axis."""
    masks = _class_masks(
        pred, label, num_classes=num_classes, include_background=include_background, onehot=onehot
    )
    return np.array([hd95(p, g, spacing=spacing, percentile=percentile) for _, p, g in masks])


def rve_per_class(
    pred: ArrayLike,
    label: ArrayLike,
    *,
    num_classes: int,
    include_background: bool = False,
    onehot: bool = False,
) -> np.ndarray:
    """Relative volume error of each class of one case (signed; -0.5 = half the volume)."""
    masks = _class_masks(
        pred, label, num_classes=num_classes, include_background=include_background, onehot=onehot
    )
    return np.array([relative_volume_error(p, g) for _, p, g in masks])


def evaluate_case(
    pred: ArrayLike,
    label: ArrayLike,
    *,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    include_background: bool = False,
    ignore_empty: bool = False,
    onehot: bool = False,
) -> dict[str, float]:
    """All metrics of one case as ``{"dice_1": .., "hd95_1": .., "rve_1": .., ...}``.

    Example:
        >>> evaluate_case(pred, label, num_classes=2, spacing=(0.8, 0.8, 2.5))["hd95_1"]
    """
    masks = _class_masks(
        pred, label, num_classes=num_classes, include_background=include_background, onehot=onehot
    )
    out: dict[str, float] = {}
    for c, p, g in masks:
        out[f"dice_{c}"] = dice_score(p, g, ignore_empty=ignore_empty)
        out[f"hd95_{c}"] = hd95(p, g, spacing=spacing)
        out[f"rve_{c}"] = relative_volume_error(p, g)
    return out


def summarize(per_case: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over cases, skipping nan (nan if a metric has no value).

    Also gives ``"<metric>_n"``, the number of cases that had a value, and ``"num_cases"``.

    Example:
        >>> summarize([{"dice_1": 0.8}, {"dice_1": float("nan")}])
        {'dice_1': 0.8, 'dice_1_n': 1, 'num_cases': 2}
    """
    keys: list[str] = []
    for case in per_case:
        keys.extend(k for k in case if k not in keys)
    out: dict[str, float] = {}
    for key in keys:
        values = [float(case[key]) for case in per_case if key in case]
        valid = [v for v in values if not math.isnan(v)]
        out[key] = float(np.mean(valid)) if valid else math.nan
        out[f"{key}_n"] = len(valid)
    out["num_cases"] = len(per_case)
    return out
