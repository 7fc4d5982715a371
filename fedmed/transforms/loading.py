"""``LoadImaged``: NIfTI paths in a data item become channel-first tensors plus metadata.

Images load as ``float32``. Labels (the keys in ``label_keys``) load as ``uint8``: eight times
smaller than ``int64`` in a cache, enough for 255 classes, and every fedmed transform keeps it;
convert with ``.long()`` where a loss needs ``int64``. A label file whose values are not whole
numbers in ``[0, 255]`` raises :class:`~fedmed.errors.DataError` naming the file.

Example:
    >>> load = LoadImaged(("image", "label"))
    >>> item = load({"image": "imagesTr/p01.nii.gz", "label": "labelsTr/p01.nii.gz"})
    >>> item["image"].shape, item["label"].dtype, item["image_meta"]["spacing"]
    (torch.Size([1, 64, 64, 32]), torch.uint8, [0.7, 0.7, 2.5])
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmed.errors import DataError
from fedmed.io.header import DEFAULT_MAX_IMAGE_BYTES
from fedmed.io.nifti import read_nifti
from fedmed.transforms.base import MapTransform
from fedmed.transforms.meta import meta_key, spacing_of

__all__ = ["LABEL_DTYPE", "LoadImaged"]

LABEL_DTYPE = torch.uint8


class LoadImaged(MapTransform):
    """Read each key's NIfTI file into ``d[key]`` (C, X, Y, Z) and ``d[f"{key}_meta"]``.

    A 3D file gets one channel; a 4D file's last axis becomes the channels. ``label_keys``
    are the keys holding segmentations (loaded as ``uint8``). ``max_bytes`` is the per-image
    memory limit of :func:`~fedmed.io.nifti.read_nifti` (it changes no output, so it is not
    part of the config).
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        *,
        label_keys: str | Sequence[str] = ("label",),
        allow_missing_keys: bool = False,
        max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        self.label_keys = (label_keys,) if isinstance(label_keys, str) else tuple(label_keys)
        self.max_bytes = max_bytes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key]
            if not isinstance(source, (str, Path)):
                raise DataError(
                    f"LoadImaged: {key!r} should be a NIfTI file path, got {type(source).__name__}"
                )
            d[key], d[meta_key(key)] = load_volume(
                source, label=key in self.label_keys, max_bytes=self.max_bytes
            )
        return d

    def params(self) -> dict[str, Any]:
        return {"label_keys": list(self.label_keys)}


def load_volume(
    path: str | Path, *, label: bool = False, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One NIfTI file as ``(channel-first tensor, meta dict)``."""
    volume = read_nifti(path, max_bytes=max_bytes)
    array = volume.array
    if label:
        array = _label_array(array, volume.path)
    elif array.dtype != np.float32:
        array = array.astype(np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    tensor = tensor.unsqueeze(0) if tensor.ndim == 3 else tensor.permute(3, 0, 1, 2)
    affine = torch.from_numpy(volume.affine.copy())
    meta = {
        "affine": affine,
        "original_affine": affine.clone(),
        "original_shape": [int(s) for s in array.shape[:3]],
        "spacing": spacing_of(affine),
        "filename": str(volume.path),
        "history": [],
    }
    return tensor, meta


def _label_array(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0 or high > 255:
        raise DataError(
            f"{path}: label values must be class indices in [0, 255], found range "
            f"[{low}, {high}]; is this an image rather than a label?"
        )
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.mod(array, 1) == 0):
        raise DataError(
            f"{path}: label values must be whole numbers (class indices), found fractional "
            "values; re-export the segmentation without interpolation"
        )
    return array.astype(np.uint8)
