"""Elastic deformation: a coarse random displacement grid, upsampled, applied by grid_sample.

Floating tensors (images) are interpolated linearly; integer tensors (labels) take the
nearest voxel, so a label never gains values outside its label set. Deformation is not
recorded in the history (it is a training augmentation, not undone at inference).

Example:
    >>> item = RandElasticd(("image", "label"), prob=0.3, magnitude=(0.0, 4.0))(item)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedmed.transforms.base import MapTransform, RandomTransform

__all__ = ["Elasticd", "RandElasticd", "coarse_displacement", "elastic_deform"]


def coarse_displacement(grid_size: Sequence[int], magnitude: float, seed: int) -> torch.Tensor:
    """Control-point displacements ``(n, *grid_size)`` in voxels, uniform in ±magnitude."""
    generator = torch.Generator().manual_seed(int(seed))
    field = torch.rand((len(grid_size), *grid_size), generator=generator, dtype=torch.float32)
    return (field * 2.0 - 1.0) * magnitude


def elastic_deform(x: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Warp channel-first ``x`` by ``displacement`` (n, *coarse), upsampled to ``x``'s grid.

    Output voxel ``i`` takes the input at ``i + displacement(i)`` (border values outside).
    """
    spatial = list(x.shape[1:])
    n = len(spatial)
    if displacement.shape[0] != n:
        raise ValueError(f"a displacement for {displacement.shape[0]} axes cannot warp {spatial}")
    mode = "trilinear" if n == 3 else "bilinear"
    field = F.interpolate(
        displacement[None].to(device=x.device, dtype=torch.float32),
        size=spatial,
        mode=mode,
        align_corners=True,
    )[0]
    coords = []
    for axis, size in enumerate(spatial):
        shape = [1] * n
        shape[axis] = size
        step = 2.0 / (size - 1) if size > 1 else 0.0
        base = torch.arange(size, device=x.device, dtype=torch.float32).view(shape) * step - 1.0
        coords.append(base + field[axis] * step)
    # grid_sample wants (x, y, z) = (last axis, ..., first axis)
    grid = torch.stack(coords[::-1], dim=-1)[None]
    if x.is_floating_point():
        return F.grid_sample(
            x[None], grid, mode="bilinear", padding_mode="border", align_corners=True
        )[0]
    warped = F.grid_sample(
        x[None].to(torch.float32), grid, mode="nearest", padding_mode="border", align_corners=True
    )[0]
    return warped.to(x.dtype)


def _grid_size(value: int | Sequence[int], owner: str) -> tuple[int, ...]:
    sizes = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if any(s < 2 for s in sizes):
        raise ValueError(
            f"{owner}: grid_size needs at least 2 control points per axis, got {value}"
        )
    return sizes


class Elasticd(MapTransform):
    """Deform every key by the displacement drawn from ``seed`` (same field for all keys)."""

    def __init__(
        self,
        keys: str | Sequence[str],
        *,
        magnitude: float,
        seed: int,
        grid_size: int | Sequence[int] = 5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        if magnitude < 0:
            raise ValueError(f"Elasticd: magnitude must be >= 0 voxels, got {magnitude}")
        self.magnitude, self.seed = float(magnitude), int(seed)
        self.grid_size = _grid_size(grid_size, "Elasticd")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            sizes = self.grid_size
            if len(sizes) != x.ndim - 1:
                sizes = (sizes[0],) * (x.ndim - 1)
            d[key] = elastic_deform(x, coarse_displacement(sizes, self.magnitude, self.seed))
        return d

    def params(self) -> dict[str, Any]:
        return {"magnitude": self.magnitude, "seed": self.seed, "grid_size": list(self.grid_size)}


class RandElasticd(RandomTransform):
    """With probability ``prob`` deform elastically, magnitude (voxels) ``~ U(magnitude)``.

    ``grid_size`` control points per axis set the smoothness: fewer points, smoother warps.
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        *,
        prob: float = 0.1,
        magnitude: tuple[float, float] = (0.0, 4.0),
        grid_size: int | Sequence[int] = 5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob=prob, allow_missing_keys=allow_missing_keys)
        low, high = (float(m) for m in magnitude)
        if not 0 <= low <= high:
            raise ValueError(
                f"RandElasticd: magnitude must be (low, high) voxels with 0 <= low <= high, "
                f"got {magnitude}"
            )
        self.magnitude = (low, high)
        self.grid_size = _grid_size(grid_size, "RandElasticd")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if not self.should_apply():
            return dict(data)
        twin = Elasticd(
            self.keys,
            magnitude=self.uniform(*self.magnitude),
            seed=self.randint(0, 2**31 - 1),
            grid_size=self.grid_size,
            allow_missing_keys=self.allow_missing_keys,
        )
        return twin(data)

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "magnitude": list(self.magnitude),
            "grid_size": list(self.grid_size),
        }
