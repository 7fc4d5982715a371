"""Patch sampling by label: precomputed foreground/background indices and the pos/neg crop.

``FgBgToIndicesd`` is deterministic, so a caching dataset stores its flat voxel indices with
the item; ``RandCropByPosNegLabeld`` then draws a centre with a handful of random numbers and
returns crops as views (no pass over the volume, no copy). Without stored indices it computes
them on each call, like MONAI.

Example:
    >>> prefix = Compose([load, orient, window, FgBgToIndicesd("label")])
    >>> crop = RandCropByPosNegLabeld(("image", "label"), "label", (96, 96, 96), num_samples=4)
    >>> patches = crop(prefix(case))          # a list of 4 dicts
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from fedmed.errors import DataError
from fedmed.transforms.base import MapTransform, RandomTransform
from fedmed.transforms.croppad import crop_key

__all__ = ["FgBgToIndicesd", "RandCropByPosNegLabeld", "fg_bg_indices"]


def fg_bg_indices(
    label: torch.Tensor,
    image: torch.Tensor | None = None,
    *,
    image_threshold: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat spatial indices of foreground (any channel > 0) and background voxels.

    With ``image``, background is limited to voxels where the image exceeds
    ``image_threshold`` (e.g. inside the body). Indices are ``int32`` when they fit, to halve
    the memory a cache spends on them.
    """
    foreground = (label > 0).any(dim=0).flatten()
    background = ~foreground
    if image is not None:
        background &= (image > image_threshold).any(dim=0).flatten()
    dtype = torch.int32 if foreground.numel() < 2**31 else torch.int64
    fg = torch.nonzero(foreground).flatten().to(dtype)
    bg = torch.nonzero(background).flatten().to(dtype)
    return fg, bg


class FgBgToIndicesd(MapTransform):
    """Store ``d[f"{key}_fg_indices"]`` and ``d[f"{key}_bg_indices"]`` for each label key."""

    def __init__(
        self,
        keys: str | Sequence[str] = "label",
        *,
        image_key: str | None = None,
        image_threshold: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        self.image_key = image_key
        self.image_threshold = float(image_threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = _image(d, self.image_key, "FgBgToIndicesd")
        for key in self.key_iterator(d):
            fg, bg = fg_bg_indices(d[key], image, image_threshold=self.image_threshold)
            d[f"{key}_fg_indices"], d[f"{key}_bg_indices"] = fg, bg
        return d

    def params(self) -> dict[str, Any]:
        return {"image_key": self.image_key, "image_threshold": self.image_threshold}


def _image(d: Mapping[Hashable, Any], image_key: str | None, who: str) -> torch.Tensor | None:
    if image_key is None:
        return None
    if image_key not in d:
        raise DataError(f"{who}: image_key {image_key!r} is not in the data item")
    return d[image_key]


class RandCropByPosNegLabeld(RandomTransform):
    """Crop ``num_samples`` patches centred on foreground with odds ``pos : neg``; a list.

    ``spatial_size`` entries of -1 take the whole axis. For 2D training on axial slices use
    ``spatial_size=(H, W, 1)`` and ``squeeze_depth=True`` to get ``(C, H, W)`` patches.
    Stored indices (``{label_key}_fg_indices`` / ``_bg_indices``, from :class:`FgBgToIndicesd`)
    are used when present; they are left out of the returned patches, whose geometry they no
    longer describe. Each crop is recorded as a ``SpatialCropd`` step (views, no copies).
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        label_key: str,
        spatial_size: Sequence[int],
        *,
        pos: float = 1.0,
        neg: float = 1.0,
        num_samples: int = 1,
        image_key: str | None = None,
        image_threshold: float = 0.0,
        squeeze_depth: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        owner = "RandCropByPosNegLabeld"
        self.spatial_size = tuple(int(s) for s in spatial_size)
        if not self.spatial_size or any(s < 1 and s != -1 for s in self.spatial_size):
            raise ValueError(
                f"{owner}: spatial_size entries must be >= 1 or -1, got {spatial_size}"
            )
        if pos < 0 or neg < 0 or pos + neg <= 0:
            raise ValueError(f"{owner}: pos and neg must be >= 0 and not both 0, got {pos}, {neg}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"{owner}: num_samples must be an integer >= 1, got {num_samples!r}")
        if squeeze_depth and self.spatial_size[-1] != 1:
            raise ValueError(
                f"{owner}: squeeze_depth needs spatial_size with 1 on the last (depth) axis, got "
                f"{self.spatial_size}"
            )
        self.label_key, self.image_key = label_key, image_key
        self.pos, self.neg, self.num_samples = float(pos), float(neg), num_samples
        self.image_threshold, self.squeeze_depth = float(image_threshold), squeeze_depth

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:  # type: ignore[override]
        owner = type(self).__name__
        if self.label_key not in data:
            raise DataError(
                f"{owner}: label_key {self.label_key!r} is not in the data item "
                f"(keys: {sorted(map(str, data))})"
            )
        label = data[self.label_key]
        shape = [int(s) for s in label.shape[1:]]
        size = self._size(shape)
        fg_key, bg_key = f"{self.label_key}_fg_indices", f"{self.label_key}_bg_indices"
        fg, bg = data.get(fg_key), data.get(bg_key)
        if fg is None or bg is None:
            image = _image(data, self.image_key, owner)
            fg, bg = fg_bg_indices(label, image, image_threshold=self.image_threshold)
        if len(fg) == 0 and len(bg) == 0:
            raise DataError(f"{owner}: {self.label_key!r} has no voxel to centre a crop on")
        base = {k: v for k, v in data.items() if k not in (fg_key, bg_key)}
        keys = list(self.key_iterator(base))
        for key in keys:
            if list(base[key].shape[1:]) != shape:
                raise DataError(
                    f"{owner}: {key!r} has spatial shape {list(base[key].shape[1:])} but "
                    f"{self.label_key!r} has {shape}; they must share one grid"
                )
        # all random numbers for this call in two draws (float64: exact for huge index lists)
        draws = torch.rand((self.num_samples, 2), generator=self.generator, dtype=torch.float64)
        ratio = self.pos / (self.pos + self.neg)
        samples = []
        for use_draw, pick_draw in draws.tolist():
            indices = fg if (use_draw < ratio and len(fg)) or not len(bg) else bg
            flat = int(indices[int(pick_draw * len(indices))])
            start, end = _box_around(flat, shape, size)
            sample = dict(base)
            for key in keys:
                crop_key(sample, key, start, end, "SpatialCropd")
                if self.squeeze_depth:
                    sample[key] = sample[key].squeeze(-1)
            samples.append(sample)
        return samples

    def _size(self, shape: list[int]) -> list[int]:
        if len(shape) != len(self.spatial_size):
            raise DataError(
                f"{type(self).__name__}: spatial_size {self.spatial_size} has "
                f"{len(self.spatial_size)} axes but {self.label_key!r} has spatial shape {shape}"
            )
        size = [n if s == -1 else s for s, n in zip(self.spatial_size, shape, strict=True)]
        if any(s > n for s, n in zip(size, shape, strict=True)):
            raise DataError(
                f"{type(self).__name__}: spatial_size {self.spatial_size} is larger than the "
                f"item's spatial shape {shape}; add SpatialPadd(keys, {tuple(size)}) before it"
            )
        return size

    def params(self) -> dict[str, Any]:
        return {
            "label_key": self.label_key,
            "spatial_size": list(self.spatial_size),
            "pos": self.pos,
            "neg": self.neg,
            "num_samples": self.num_samples,
            "image_key": self.image_key,
            "image_threshold": self.image_threshold,
            "squeeze_depth": self.squeeze_depth,
        }


def _box_around(flat: int, shape: list[int], size: list[int]) -> tuple[list[int], list[int]]:
    """The crop box of ``size`` centred on flat index ``flat``, moved inside ``shape``."""
    center = []
    for n in reversed(shape):
        flat, coordinate = divmod(flat, n)
        center.append(coordinate)
    center.reverse()
    start = [min(max(c - s // 2, 0), n - s) for c, s, n in zip(center, size, shape, strict=True)]
    return start, [b + s for b, s in zip(start, size, strict=True)]
