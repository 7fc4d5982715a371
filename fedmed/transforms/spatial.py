"""Deterministic spatial transforms that move voxels: orientation, spacing, flip, quarter turns.

Each one records the parameters it applied into ``d[f"{key}_meta"]["history"]``, updates the
affine and spacing, and can be undone (``transform.inverse()`` for the last step,
:func:`~fedmed.transforms.invert.invert` for the whole history). Keys without a meta dict
(e.g. a tensor made by a MONAI transform) are transformed without any record, except by
``Orientationd`` and ``Spacingd``, which need the affine. Integer tensors (labels) are
resampled with nearest neighbour, floating ones (images) with linear interpolation.

Example:
    >>> item = Orientationd(("image", "label"))(item)           # to RAS
    >>> item = Spacingd(("image", "label"), (1.0, 1.0, 2.5))(item)

Crops and pads live in :mod:`fedmed.transforms.croppad`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel.orientations as nio
import numpy as np
import torch

from fedmed.errors import DataError
from fedmed.transforms import functional as fn
from fedmed.transforms.base import InvertibleTransform
from fedmed.transforms.meta import get_meta, meta_key, record_step

__all__ = ["Flipd", "Orientationd", "Rotate90d", "Spacingd", "int_tuple", "store_step"]


def store_step(
    d: dict[Hashable, Any],
    key: str,
    out: torch.Tensor,
    index_map: torch.Tensor,
    name: str,
    params: dict[str, Any],
) -> None:
    """Put ``out`` under ``key`` and, when the key has a meta dict, record the step in it."""
    d[key] = out
    meta = d.get(meta_key(key))
    if meta is not None:
        d[meta_key(key)] = record_step(meta, index_map, name, params)


def int_tuple(value: int | Sequence[int], name: str, owner: str) -> tuple[int, ...]:
    """``value`` as a tuple of ints; anything else raises ``ValueError`` naming ``name``."""
    values = tuple(value) if isinstance(value, Sequence) else (value,)
    if not all(isinstance(v, (int, np.integer)) for v in values):
        raise ValueError(f"{owner}: {name} must be integers, got {value!r}")
    return tuple(int(v) for v in values)


def _check_axes(axes: Sequence[int], x: torch.Tensor, name: str, owner: str) -> None:
    for axis in axes:
        if not 0 <= axis < x.ndim - 1:
            raise ValueError(
                f"{owner}: {name}={tuple(axes)} is out of range for a tensor with "
                f"{x.ndim - 1} spatial axes (shape {tuple(x.shape)})"
            )


def _require_3d(x: torch.Tensor, key: str, owner: str) -> None:
    if x.ndim != 4:
        raise DataError(
            f"{owner}: {key!r} must be a channel-first 3D volume (C, X, Y, Z), got shape "
            f"{tuple(x.shape)}; apply it before slicing or squeezing to 2D"
        )


class Flipd(InvertibleTransform):
    """Reverse the spatial axes in ``spatial_axis`` (0 is the first spatial axis)."""

    def __init__(
        self,
        keys: str | Sequence[str],
        spatial_axis: int | Sequence[int],
        *,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        self.spatial_axis = int_tuple(spatial_axis, "spatial_axis", type(self).__name__)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            _check_axes(self.spatial_axis, d[key], "spatial_axis", "Flipd")
            out, index_map = fn.flip(d[key], self.spatial_axis)
            store_step(d, key, out, index_map, "Flipd", self.params())
        return d

    @classmethod
    def undo(cls, x: torch.Tensor, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return fn.flip(x, params["spatial_axis"])

    def params(self) -> dict[str, Any]:
        return {"spatial_axis": list(self.spatial_axis)}


class Rotate90d(InvertibleTransform):
    """Rotate by ``k`` quarter turns in the plane of ``spatial_axes``, like ``torch.rot90``."""

    def __init__(
        self,
        keys: str | Sequence[str],
        k: int = 1,
        *,
        spatial_axes: tuple[int, int] = (0, 1),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        axes = int_tuple(spatial_axes, "spatial_axes", "Rotate90d")
        if len(axes) != 2 or axes[0] == axes[1]:
            raise ValueError(f"Rotate90d: spatial_axes must be two different axes, got {axes}")
        self.k = int(k) % 4
        self.spatial_axes = (axes[0], axes[1])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            _check_axes(self.spatial_axes, d[key], "spatial_axes", "Rotate90d")
            out, index_map = fn.rot90(d[key], self.k, self.spatial_axes)
            store_step(d, key, out, index_map, "Rotate90d", self.params())
        return d

    @classmethod
    def undo(cls, x: torch.Tensor, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return fn.rot90(x, -params["k"], tuple(params["spatial_axes"]))

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "spatial_axes": list(self.spatial_axes)}


class Orientationd(InvertibleTransform):
    """Permute and flip axes so the voxel axes follow ``axcodes`` (default RAS), via nibabel."""

    def __init__(
        self,
        keys: str | Sequence[str],
        axcodes: str = "RAS",
        *,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        try:
            self.target = nio.axcodes2ornt(tuple(axcodes))
        except Exception as err:  # nibabel raises ValueError or KeyError for bad codes
            raise ValueError(
                f"Orientationd: axcodes must be three letters from L/R, A/P, S/I like 'RAS', "
                f"got {axcodes!r}"
            ) from err
        if len(axcodes) != 3 or np.isnan(self.target).any():
            raise ValueError(f"Orientationd: axcodes must name three axes, got {axcodes!r}")
        self.axcodes = axcodes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            meta = get_meta(d, key, "Orientationd")
            _require_3d(d[key], key, "Orientationd")
            perm, flips = self._plan(meta)
            out, index_map = fn.orient(d[key], perm, flips)
            store_step(d, key, out, index_map, "Orientationd", {"perm": perm, "flips": flips})
        return d

    def _plan(self, meta: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        current = nio.io_orientation(meta["affine"].numpy())
        if np.isnan(current).any():
            raise DataError(
                f"{meta.get('filename', 'item')}: the affine has degenerate axes, so its "
                "orientation is undefined; fix the file's header"
            )
        perm, flips = [], []
        for out_axis, (world_axis, sign) in enumerate(self.target):
            in_axis = int(np.flatnonzero(current[:, 0] == world_axis)[0])
            perm.append(in_axis)
            if current[in_axis, 1] != sign:
                flips.append(out_axis)
        return perm, flips

    @classmethod
    def undo(cls, x: torch.Tensor, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        unflipped, first = fn.flip(x, params["flips"])
        inverse_perm = [params["perm"].index(i) for i in range(len(params["perm"]))]
        restored, second = fn.permute(unflipped, inverse_perm)
        return restored, first @ second

    def params(self) -> dict[str, Any]:
        return {"axcodes": self.axcodes}


class Spacingd(InvertibleTransform):
    """Resample to voxel size ``pixdim`` (mm); the undo returns the original shape exactly.

    The field of view is kept: ``n`` voxels of size ``s`` become ``floor(n * s / pixdim)``
    voxels of size ``pixdim``, centres aligned (values come back approximately on undo).
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        pixdim: Sequence[float],
        *,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        values = tuple(float(p) for p in pixdim)
        if len(values) != 3 or not all(np.isfinite(p) and p > 0 for p in values):
            raise ValueError(f"Spacingd: pixdim must be three positive sizes in mm, got {pixdim}")
        self.pixdim = values

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            meta = get_meta(d, key, "Spacingd")
            _require_3d(d[key], key, "Spacingd")
            x = d[key]
            shape = fn.spatial_shape(x)
            scale = [
                fn.exact_scale(n, s / p)
                for n, s, p in zip(shape, meta["spacing"], self.pixdim, strict=True)
            ]
            new_shape = [fn.resampled_size(n, s) for n, s in zip(shape, scale, strict=True)]
            if min(new_shape) < 1:
                raise DataError(
                    f"{meta.get('filename', key)}: resampling shape {shape} at spacing "
                    f"{meta['spacing']} to pixdim {self.pixdim} leaves no voxels"
                )
            out, index_map = fn.resample(x, scale)
            store_step(d, key, out, index_map, "Spacingd", {"scale": scale, "shape": shape})
        return d

    @classmethod
    def undo(cls, x: torch.Tensor, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        out, index_map = fn.resample(x, [1.0 / s for s in params["scale"]])
        # the scale is exact, so only trailing voxels can be missing or extra
        return fn.fit_to_shape(out, params["shape"]), index_map

    def params(self) -> dict[str, Any]:
        return {"pixdim": list(self.pixdim)}
