"""Spatial tensor operations, each written once, each returning ``(output, index_map)``.

Tensors are channel-first ``(C, *spatial)`` on any device and of any dtype. The index map is
the homogeneous matrix with ``old_index = M @ new_index`` (see :mod:`fedmed.transforms.meta`),
so a caller can update the affine without knowing the operation. Crops are views; nothing is
modified in place.

Example:
    >>> patch, index_map = crop(image, (10, 0, 4), (42, 32, 20))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedmed.transforms.meta import translation

__all__ = [
    "crop",
    "exact_scale",
    "fit_to_shape",
    "flip",
    "orient",
    "pad",
    "permute",
    "resample",
    "rot90",
    "spatial_shape",
]


def spatial_shape(x: torch.Tensor) -> list[int]:
    """The spatial sizes of a channel-first tensor."""
    return [int(s) for s in x.shape[1:]]


def crop(
    x: torch.Tensor, start: Sequence[int], end: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The view ``x[:, start[0]:end[0], ...]``."""
    index = (slice(None), *(slice(int(s), int(e)) for s, e in zip(start, end, strict=True)))
    return x[index], translation(start)


def pad(
    x: torch.Tensor, before: Sequence[int], after: Sequence[int], *, value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad every spatial axis with ``value``: ``before[i]`` voxels in front, ``after[i]`` behind."""
    if not any(before) and not any(after):
        return x, translation([0] * len(before))
    shape = [x.shape[0]] + [n + b + a for n, b, a in zip(x.shape[1:], before, after, strict=True)]
    out = torch.full(shape, value, dtype=x.dtype, device=x.device)
    index = (slice(None), *(slice(b, b + n) for b, n in zip(before, x.shape[1:], strict=True)))
    out[index] = x
    return out, translation([-b for b in before])


def flip(x: torch.Tensor, axes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse the listed spatial axes (0 is the first spatial axis)."""
    n = x.ndim - 1
    matrix = torch.eye(n + 1, dtype=torch.float64)
    for axis in axes:
        matrix[axis, axis] = -1.0
        matrix[axis, n] = x.shape[axis + 1] - 1
    if not axes:
        return x, matrix
    return torch.flip(x, [a + 1 for a in axes]), matrix


def permute(x: torch.Tensor, perm: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder spatial axes: output axis ``i`` is input axis ``perm[i]`` (a view)."""
    n = len(perm)
    matrix = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for new, old in enumerate(perm):
        matrix[old, new] = 1.0
    matrix[n, n] = 1.0
    return x.permute(0, *(p + 1 for p in perm)), matrix


def orient(
    x: torch.Tensor, perm: Sequence[int], flips: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute the spatial axes by ``perm``, then flip the (output) axes in ``flips``."""
    permuted, first = permute(x, perm)
    flipped, second = flip(permuted, flips)
    return flipped, first @ second


def rot90(
    x: torch.Tensor, k: int, axes: tuple[int, int] = (0, 1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate by ``k`` quarter turns in the plane of two spatial axes, like ``torch.rot90``."""
    k = k % 4
    a, b = axes
    swap = list(range(x.ndim - 1))
    swap[a], swap[b] = b, a
    if k == 0:
        return x, torch.eye(x.ndim, dtype=torch.float64)
    if k == 2:
        return flip(x, [a, b])
    # torch.rot90: k=1 is flip(b) then swap(a, b); k=3 is flip(a) then swap(a, b)
    flipped, first = flip(x, [b] if k == 1 else [a])
    swapped, second = permute(flipped, swap)  # a strided view, as torch.rot90 returns
    return swapped, first @ second


def resample(x: torch.Tensor, scale: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize by ``scale`` per spatial axis, keeping voxel centres aligned to the exact scale.

    The output has ``floor(n * scale)`` voxels and output voxel ``j`` samples input position
    ``(j + 0.5) / scale - 0.5``. Floating tensors are interpolated (bi/trilinear); integer
    tensors (labels) take the nearest voxel, so no new label values appear.
    """
    n = x.ndim - 1
    if n not in (2, 3):
        raise ValueError(f"resample needs 2 or 3 spatial axes, got shape {tuple(x.shape)}")
    factors = [float(s) for s in scale]
    if x.is_floating_point():
        mode = "trilinear" if n == 3 else "bilinear"
        out = F.interpolate(
            x[None],
            scale_factor=factors,
            mode=mode,
            align_corners=False,
            recompute_scale_factor=False,
        )[0]
    else:
        # uint8 has a nearest kernel on CPU; other integer types and devices go through float32
        native = x.dtype == torch.uint8 and x.device.type == "cpu"
        source = x if native else x.to(torch.float32)
        out = F.interpolate(
            source[None],
            scale_factor=factors,
            mode="nearest-exact",
            recompute_scale_factor=False,
        )[0].to(x.dtype)
    matrix = torch.eye(n + 1, dtype=torch.float64)
    for axis, s in enumerate(factors):
        matrix[axis, axis] = 1.0 / s
        matrix[axis, n] = 0.5 / s - 0.5
    return out, matrix


def fit_to_shape(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Cut or extend (repeating the last voxel) the trailing end of each axis to ``shape``."""
    for axis, size in enumerate(shape):
        have = x.shape[axis + 1]
        if have > size:
            x = x.narrow(axis + 1, 0, size)
        elif have < size:
            index = torch.clamp(torch.arange(size, device=x.device), max=have - 1)
            x = x.index_select(axis + 1, index)
    return x


def resampled_size(size: int, scale: float) -> int:
    """Output size of :func:`resample` along one axis (what ``F.interpolate`` computes)."""
    return math.floor(size * scale)


def exact_scale(size: int, scale: float, *, tolerance: float = 1e-4) -> float:
    """``scale``, raised by a few ulps where float error would floor ``size * scale`` too low.

    Headers store affines in float32, so 16 voxels of 0.7 mm resampled to 1.4 mm give
    ``16 * 0.49999999 = 7.9999998``; the intended 8 voxels need the scale nudged.
    """
    target = math.floor(size * scale + tolerance)
    if math.floor(size * scale) < target:
        scale = target / size
        while math.floor(size * scale) < target:  # at most a couple of ulps
            scale = math.nextafter(scale, math.inf)
    return scale
