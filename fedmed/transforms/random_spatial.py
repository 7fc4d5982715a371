"""Random flips and quarter turns: sample the parameters, apply ``Flipd`` / ``Rotate90d``.

Because the twins are invertible and recorded, test-time augmentation can undo them with
:func:`~fedmed.transforms.invert.invert`.

Example:
    >>> augment = Compose([RandFlipd(("image", "label"), prob=0.5, spatial_axis=0),
    ...                    RandRotate90d(("image", "label"), prob=0.5)]).set_random_state(0)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from fedmed.transforms.base import RandomTransform
from fedmed.transforms.spatial import Flipd, Rotate90d

__all__ = ["RandFlipd", "RandRotate90d"]


class RandFlipd(RandomTransform):
    """With probability ``prob`` flip ``spatial_axis`` (``None``: every spatial axis)."""

    def __init__(
        self,
        keys: str | Sequence[str],
        *,
        prob: float = 0.1,
        spatial_axis: int | Sequence[int] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob=prob, allow_missing_keys=allow_missing_keys)
        if spatial_axis is None:
            self.spatial_axis: tuple[int, ...] | None = None
        else:
            # Flipd validates the values; building one here rejects bad input early
            self.spatial_axis = Flipd(self.keys, spatial_axis).spatial_axis

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if not self.should_apply():
            return dict(data)
        axes = self.spatial_axis
        if axes is None:
            first = next(self.key_iterator(data), None)
            if first is None:
                return dict(data)
            axes = tuple(range(data[first].ndim - 1))
        return Flipd(self.keys, axes, allow_missing_keys=self.allow_missing_keys)(data)

    def params(self) -> dict[str, Any]:
        axes = None if self.spatial_axis is None else list(self.spatial_axis)
        return {**super().params(), "spatial_axis": axes}


class RandRotate90d(RandomTransform):
    """With probability ``prob`` rotate by ``k`` quarter turns, ``k`` uniform in 1..max_k."""

    def __init__(
        self,
        keys: str | Sequence[str],
        *,
        prob: float = 0.1,
        max_k: int = 3,
        spatial_axes: tuple[int, int] = (0, 1),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob=prob, allow_missing_keys=allow_missing_keys)
        if not isinstance(max_k, int) or max_k < 1:
            raise ValueError(f"RandRotate90d: max_k must be an integer >= 1, got {max_k!r}")
        self.max_k = max_k
        self.spatial_axes = Rotate90d(self.keys, 1, spatial_axes=spatial_axes).spatial_axes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if not self.should_apply():
            return dict(data)
        k = self.randint(1, self.max_k + 1)
        twin = Rotate90d(
            self.keys, k, spatial_axes=self.spatial_axes, allow_missing_keys=self.allow_missing_keys
        )
        return twin(data)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "max_k": self.max_k, "spatial_axes": list(self.spatial_axes)}
