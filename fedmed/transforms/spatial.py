"""Deterministic spatial transforms: orientation, spacing, crop, pad, flip, quarter turns.

Each one records the parameters it applied into ``d[f"{key}_meta"]["history"]``, updates the
affine and spacing, and can be undone (``transform.inverse()`` for the last step,
:func:`~fedmed.transforms.invert.invert` for the whole history). Keys without a meta dict
(e.g. a tensor made by a MONAI transform) are transformed without any record, except by
``Orientationd`` and ``Spacingd``, which need the affine. Integer tensors (labels) are
resampled with nearest neighbour, floating ones (images) with linear interpolation.

Example:
    >>> item = Orientationd(("image", "label"))(item)           # to RAS
    >>> item = Spacingd(("image", "label"), (1.0, 1.0, 2.5))(item)
    >>> item = CropForegroundd(("image", "label"), source_key="image", margin=4)(item)
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

__all__ = [
    "CropForegroundd",
    "Flipd",
    "Orientationd",
    "Rotate90d",
    "Spacingd",
    "SpatialCropd",
    "SpatialPadd",
    "store_step",
]


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


def _int_tuple(value: int | Sequence[int], name: str, owner: str) -> tuple[int, ...]:
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
        self.spatial_axis = _int_tuple(spatial_axis, "spatial_axis", type(self).__name__)

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
        axes = _int_tuple(spatial_axes, "spatial_axes", "Rotate90d")
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


class SpatialCropd(InvertibleTransform):
    """Crop every key to ``[roi_start, roi_end)`` (a view); the undo pads with zeros."""

    def __init__(
        self,
        keys: str | Sequence[str],
        roi_start: Sequence[int],
        roi_end: Sequence[int],
        *,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        self.roi_start = _int_tuple(roi_start, "roi_start", "SpatialCropd")
        self.roi_end = _int_tuple(roi_end, "roi_end", "SpatialCropd")
        if len(self.roi_start) != len(self.roi_end) or any(
            s < 0 or e <= s for s, e in zip(self.roi_start, self.roi_end, strict=True)
        ):
            raise ValueError(
                f"SpatialCropd: need 0 <= roi_start < roi_end per axis, got roi_start="
                f"{self.roi_start}, roi_end={self.roi_end}"
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            crop_key(d, key, self.roi_start, self.roi_end, "SpatialCropd")
        return d

    @classmethod
    def undo(cls, x: torch.Tensor, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        after = [n - e for n, e in zip(params["shape"], params["end"], strict=True)]
        return fn.pad(x, params["start"], after)

    def params(self) -> dict[str, Any]:
        return {"roi_start": list(self.roi_start), "roi_end": list(self.roi_end)}


def crop_key(
    d: dict[Hashable, Any], key: str, start: Sequence[int], end: Sequence[int], name: str
) -> None:
    """Crop ``d[key]`` to the box and record it as step ``name`` (undone by zero padding)."""
    x = d[key]
    shape = fn.spatial_shape(x)
    if len(start) != len(shape) or any(e > n for e, n in zip(end, shape, strict=True)):
        raise DataError(
            f"{name}: the box {list(start)}..{list(end)} does not fit {key!r} of spatial shape "
            f"{shape}"
        )
    out, index_map = fn.crop(x, start, end)
    params = {"start": list(start), "end": list(end), "shape": shape}
    store_step(d, key, out, index_map, name, params)


class CropForegroundd(InvertibleTransform):
    """Crop every key to the box around ``d[source_key] > threshold``, plus ``margin`` voxels.

    All keys must share the source's spatial shape. With no foreground the item is kept whole.
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        source_key: str,
        *,
        threshold: float = 0.0,
        margin: int | Sequence[int] = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        self.source_key = source_key
        self.threshold = float(threshold)
        self.margin = _int_tuple(margin, "margin", "CropForegroundd")
        if any(m < 0 for m in self.margin):
            raise ValueError(f"CropForegroundd: margin must be >= 0, got {margin!r}")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.source_key not in d:
            raise DataError(
                f"CropForegroundd: source_key {self.source_key!r} is not in the data item "
                f"(keys: {sorted(map(str, d))})"
            )
        start, end = self.box(d[self.source_key])
        for key in self.key_iterator(d):
            crop_key(d, key, start, end, "CropForegroundd")
        return d

    def box(self, source: torch.Tensor) -> tuple[list[int], list[int]]:
        """The crop box ``(start, end)`` for a channel-first source tensor."""
        mask = (source > self.threshold).any(dim=0)
        shape = list(mask.shape)
        margin = self.margin * len(shape) if len(self.margin) == 1 else self.margin
        if len(margin) != len(shape):
            raise ValueError(f"CropForegroundd: margin {self.margin} does not match {shape}")
        if not bool(mask.any()):
            return [0] * len(shape), shape
        start, end = [], []
        for axis in range(len(shape)):
            others = [a for a in range(len(shape)) if a != axis]
            hits = torch.nonzero(mask.amax(dim=others) if others else mask).flatten()
            start.append(max(int(hits[0]) - margin[axis], 0))
            end.append(min(int(hits[-1]) + 1 + margin[axis], shape[axis]))
        return start, end

    @classmethod
    def undo(cls, x: torch.Tensor, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return SpatialCropd.undo(x, params)

    def params(self) -> dict[str, Any]:
        return {
            "source_key": self.source_key,
            "threshold": self.threshold,
            "margin": list(self.margin),
        }


class SpatialPadd(InvertibleTransform):
    """Pad symmetrically with ``value`` up to ``spatial_size`` (-1 keeps an axis); undo crops."""

    def __init__(
        self,
        keys: str | Sequence[str],
        spatial_size: Sequence[int],
        *,
        value: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        self.spatial_size = _int_tuple(spatial_size, "spatial_size", "SpatialPadd")
        if any(s < 1 and s != -1 for s in self.spatial_size):
            raise ValueError(
                f"SpatialPadd: spatial_size entries must be >= 1 or -1, got {spatial_size!r}"
            )
        self.value = float(value)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            shape = fn.spatial_shape(d[key])
            if len(shape) != len(self.spatial_size):
                raise ValueError(
                    f"SpatialPadd: spatial_size {self.spatial_size} has {len(self.spatial_size)}"
                    f" axes but {key!r} has spatial shape {shape}"
                )
            missing = [max(s - n, 0) for s, n in zip(self.spatial_size, shape, strict=True)]
            before = [m // 2 for m in missing]
            after = [m - b for m, b in zip(missing, before, strict=True)]
            out, index_map = fn.pad(d[key], before, after, value=self.value)
            store_step(d, key, out, index_map, "SpatialPadd", {"before": before, "after": after})
        return d

    @classmethod
    def undo(cls, x: torch.Tensor, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        shape = fn.spatial_shape(x)
        end = [n - a for n, a in zip(shape, params["after"], strict=True)]
        return fn.crop(x, params["before"], end)

    def params(self) -> dict[str, Any]:
        return {"spatial_size": list(self.spatial_size), "value": self.value}
