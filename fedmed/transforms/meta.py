"""The ``{key}_meta`` dict: reading it, and recording a spatial step without mutating it.

A spatial step is described by its *index map* ``M``, the homogeneous matrix taking a voxel
index of the output to the voxel index of the input it came from (``old = M @ new``). The new
voxel-to-world affine is then ``affine @ M`` and the spacing is the affine's column norms, so
every step updates geometry the same way. Metadata is copied, never edited in place: a cached
item's meta must not grow a history every epoch.

Example:
    >>> meta = record_step(meta, translation([4, 0, 0]), "SpatialCropd", {"roi_start": [4, 0, 0]})
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from fedmed.errors import DataError

__all__ = [
    "compose_maps",
    "embed_map",
    "get_meta",
    "meta_key",
    "pop_step",
    "record_step",
    "spacing_of",
    "translation",
]


def meta_key(key: str) -> str:
    """The metadata key of ``key`` (MONAI's ``{key}_meta`` postfix)."""
    return f"{key}_meta"


def get_meta(
    data: Mapping[Hashable, Any], key: str, who: str, *, required: bool = True
) -> dict[str, Any] | None:
    """``data[f"{key}_meta"]``; a missing one raises :class:`DataError` naming it if required."""
    meta = data.get(meta_key(key))
    if meta is None and required:
        raise DataError(
            f"{who}: {meta_key(key)!r} is not in the data item, so the geometry of {key!r} is "
            "unknown; load it with LoadImaged (which writes the meta dict)"
        )
    return meta


def spacing_of(affine: torch.Tensor) -> list[float]:
    """Voxel size in mm along each array axis: the column norms of the affine's 3x3 part."""
    return [float(s) for s in torch.linalg.vector_norm(affine[:3, :3], dim=0)]


def translation(offset: Sequence[float]) -> torch.Tensor:
    """The index map of a shift: ``old = new + offset`` (crop start, or minus pad before)."""
    n = len(offset)
    matrix = torch.eye(n + 1, dtype=torch.float64)
    matrix[:n, n] = torch.tensor([float(o) for o in offset], dtype=torch.float64)
    return matrix


def compose_maps(*maps: torch.Tensor) -> torch.Tensor:
    """Index map of steps applied in order: ``old = M1 @ M2 @ ... @ new``."""
    result = maps[0]
    for matrix in maps[1:]:
        result = result @ matrix
    return result


def embed_map(matrix: torch.Tensor, dims: int = 3) -> torch.Tensor:
    """Extend an index map over fewer spatial axes (a 2D slice) to ``dims`` axes."""
    n = matrix.shape[0] - 1
    if n == dims:
        return matrix
    if n > dims:
        raise DataError(f"a {n}D spatial step cannot update a {dims}D affine")
    full = torch.eye(dims + 1, dtype=torch.float64)
    full[:n, :n] = matrix[:n, :n]
    full[:n, dims] = matrix[:n, n]
    return full


def record_step(
    meta: Mapping[str, Any], index_map: torch.Tensor, name: str, params: dict[str, Any]
) -> dict[str, Any]:
    """A new meta dict with the affine and spacing updated and ``{name, params}`` appended."""
    affine = meta["affine"] @ embed_map(index_map, meta["affine"].shape[0] - 1)
    history = [*meta.get("history", []), {"name": name, "params": params}]
    return {**meta, "affine": affine, "spacing": spacing_of(affine), "history": history}


def pop_step(meta: Mapping[str, Any], index_map: torch.Tensor) -> dict[str, Any]:
    """A new meta dict with the last history step removed and the affine moved back."""
    affine = meta["affine"] @ embed_map(index_map, meta["affine"].shape[0] - 1)
    return {
        **meta,
        "affine": affine,
        "spacing": spacing_of(affine),
        "history": meta["history"][:-1],
    }
