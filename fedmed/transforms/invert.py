"""Map tensors back to the file they came from by replaying the recorded history backwards.

A prediction made on the transformed image (same grid as ``d["image"]``) gets the image's
meta: :func:`invert_to_original` returns it on the original file's grid (shape equal to
``original_shape``; the meta's affine then equals ``original_affine``), and
:func:`save_prediction` writes it with the original affine. Integer predictions (class maps)
are resampled with nearest neighbour, floating ones (probabilities) linearly.

Example:
    >>> logits = model(item["image"][None])[0]
    >>> save_prediction("pred/p01.nii.gz", logits.argmax(0, keepdim=True).to(torch.uint8),
    ...                 item["image_meta"])
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmed.errors import DataError
from fedmed.io.nifti import write_nifti
from fedmed.transforms.base import undo_last_step
from fedmed.transforms.meta import get_meta, meta_key

__all__ = ["invert", "invert_to_original", "invert_with_meta", "save_prediction"]


def invert_with_meta(
    tensor: torch.Tensor, meta: Mapping[str, Any]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Undo every recorded step, last first; returns the tensor and meta with empty history."""
    if tensor.ndim - 1 != len(meta.get("original_shape", [])):
        raise DataError(
            f"{meta.get('filename', 'item')}: cannot invert a tensor of shape "
            f"{tuple(tensor.shape)}; give it channel-first with {len(meta['original_shape'])} "
            "spatial axes (a squeezed 2D slice cannot be mapped back)"
        )
    current: dict[str, Any] = dict(meta)
    while current.get("history"):
        tensor, current = undo_last_step(tensor, current)
    return tensor, current


def invert_to_original(tensor: torch.Tensor, meta: Mapping[str, Any]) -> torch.Tensor:
    """``tensor`` (on the grid described by ``meta``) on the original file's grid."""
    restored, _ = invert_with_meta(tensor, meta)
    return restored


def invert(data: Mapping[Hashable, Any], key: str) -> dict[Hashable, Any]:
    """A new data item with ``d[key]`` and its meta taken back to the original geometry."""
    if key not in data:
        raise DataError(
            f"invert: key {key!r} is not in the data item (keys: {sorted(map(str, data))})"
        )
    d = dict(data)
    meta = get_meta(d, key, "invert")
    d[key], d[meta_key(key)] = invert_with_meta(d[key], meta)
    return d


def save_prediction(
    path: str | Path,
    tensor: torch.Tensor,
    meta: Mapping[str, Any],
    *,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write ``tensor`` (C, *spatial) in the original geometry; one channel is written as 3D.

    Several channels are written channels-last (4D), as NIfTI expects.
    """
    restored = invert_to_original(tensor.detach(), meta).cpu()
    array = restored[0].numpy() if restored.shape[0] == 1 else restored.permute(1, 2, 3, 0).numpy()
    return write_nifti(path, array, meta["original_affine"].numpy(), dtype=dtype)
