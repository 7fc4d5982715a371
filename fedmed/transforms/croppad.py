"""Crops and pads: a fixed box, the box around the foreground, padding to a minimum size.

Crops are views of their input (no copy); the undo of a crop pads with zeros, the undo of a
pad crops. Every step is recorded in the history and moves the affine (see
:mod:`fedmed.transforms.spatial` for the conventions).

Example:
    >>> item = CropForegroundd(("image", "label"), source_key="image", margin=4)(item)
    >>> item = SpatialPadd(("image", "label"), (96, 96, 96))(item)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from fedmed.errors import DataError
from fedmed.transforms import functional as fn
from fedmed.transforms.base import InvertibleTransform
from fedmed.transforms.spatial import int_tuple, store_step

__all__ = ["CropForegroundd", "SpatialCropd", "SpatialPadd", "crop_key"]


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
        self.roi_start = int_tuple(roi_start, "roi_start", "SpatialCropd")
        self.roi_end = int_tuple(roi_end, "roi_end", "SpatialCropd")
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
        self.margin = int_tuple(margin, "margin", "CropForegroundd")
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
        self.spatial_size = int_tuple(spatial_size, "spatial_size", "SpatialPadd")
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
