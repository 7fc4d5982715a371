"""Intensity transforms: the CT window, MR z-score, and random scale, shift and Gaussian noise.

Each operation is a plain function; each random class samples its parameters and applies the
deterministic twin (``RandScaleIntensityd`` -> ``ScaleIntensityd``). Intensity steps do not
change geometry, so they record nothing in the history. Outputs are new tensors: a cached
input (or a crop viewing it) is never written to.

Example:
    >>> window = ScaleIntensityRanged("image", a_min=-1000.0, a_max=500.0)   # HU -> [0, 1]
    >>> item = RandGaussianNoised("image", prob=0.2, std=0.05)(window(item))
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from fedmed.transforms.base import MapTransform, RandomTransform

__all__ = [
    "GaussianNoised",
    "NormalizeIntensityd",
    "RandGaussianNoised",
    "RandScaleIntensityd",
    "RandShiftIntensityd",
    "ScaleIntensityRanged",
    "ScaleIntensityd",
    "ShiftIntensityd",
    "add_gaussian_noise",
    "normalize_intensity",
    "scale_intensity_range",
]


def scale_intensity_range(
    x: torch.Tensor,
    a_min: float,
    a_max: float,
    b_min: float = 0.0,
    b_max: float = 1.0,
    *,
    clip: bool = True,
) -> torch.Tensor:
    """Map ``[a_min, a_max]`` linearly to ``[b_min, b_max]`` (clipped), as float32."""
    x = x.to(torch.float32)
    out = (x - a_min) * ((b_max - b_min) / (a_max - a_min)) + b_min
    if clip:
        out = out.clamp_(min(b_min, b_max), max(b_min, b_max))
    return out


def normalize_intensity(x: torch.Tensor, *, nonzero: bool = False) -> torch.Tensor:
    """Z-score ``x`` as float32: ``(x - mean) / std`` over all voxels, or with ``nonzero``
    over the non-zero voxels only (zeros stay zero). A constant input maps to zero."""
    x = x.to(torch.float32)
    mask = x != 0 if nonzero else torch.ones_like(x, dtype=torch.bool)
    if not bool(mask.any()):
        return x.clone()
    values = x[mask]
    mean = values.mean()
    std = values.std(unbiased=False) if values.numel() > 1 else torch.zeros(())
    # MONAI's rule: a zero standard deviation divides by 1 instead.
    out = (x - mean) / (std if float(std) > 0 else 1.0)
    return torch.where(mask, out, x) if nonzero else out


def add_gaussian_noise(x: torch.Tensor, mean: float, std: float, seed: int) -> torch.Tensor:
    """``x`` plus noise drawn on ``x``'s device from a generator seeded with ``seed``."""
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + (noise * std + mean)


class ScaleIntensityRanged(MapTransform):
    """A CT window: clip ``[a_min, a_max]`` (HU) and map it to ``[b_min, b_max]``.

    Example:
        >>> ScaleIntensityRanged("image", a_min=-1250.0, a_max=250.0)   # lung window -> [0, 1]
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        a_min: float,
        a_max: float,
        *,
        b_min: float = 0.0,
        b_max: float = 1.0,
        clip: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        if not a_max > a_min:
            raise ValueError(
                f"ScaleIntensityRanged: a_max must be above a_min, got a_min={a_min}, a_max={a_max}"
            )
        self.a_min, self.a_max = float(a_min), float(a_max)
        self.b_min, self.b_max, self.clip = float(b_min), float(b_max), bool(clip)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = scale_intensity_range(
                d[key], self.a_min, self.a_max, self.b_min, self.b_max, clip=self.clip
            )
        return d

    def params(self) -> dict[str, Any]:
        return {
            "a_min": self.a_min,
            "a_max": self.a_max,
            "b_min": self.b_min,
            "b_max": self.b_max,
            "clip": self.clip,
        }


class NormalizeIntensityd(MapTransform):
    """MR intensity normalization: a z-score per volume (MONAI's ``NormalizeIntensityd``).

    Example:
        >>> NormalizeIntensityd("image", nonzero=True)   # statistics over the brain only
    """

    def __init__(
        self, keys: str | Sequence[str], *, nonzero: bool = False, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        self.nonzero = bool(nonzero)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = normalize_intensity(d[key], nonzero=self.nonzero)
        return d

    def params(self) -> dict[str, Any]:
        return {"nonzero": self.nonzero}


class ScaleIntensityd(MapTransform):
    """Multiply by ``1 + factor`` (MONAI's ``ScaleIntensity(factor=...)`` convention)."""

    def __init__(
        self, keys: str | Sequence[str], factor: float, *, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        self.factor = float(factor)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key] * (1.0 + self.factor)
        return d

    def params(self) -> dict[str, Any]:
        return {"factor": self.factor}


class ShiftIntensityd(MapTransform):
    """Add ``offset`` to every voxel."""

    def __init__(
        self, keys: str | Sequence[str], offset: float, *, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        self.offset = float(offset)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key] + self.offset
        return d

    def params(self) -> dict[str, Any]:
        return {"offset": self.offset}


class GaussianNoised(MapTransform):
    """Add Gaussian noise ``N(mean, std)`` drawn from ``seed`` (the same noise every call)."""

    def __init__(
        self,
        keys: str | Sequence[str],
        *,
        std: float,
        seed: int,
        mean: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        if std < 0:
            raise ValueError(f"GaussianNoised: std must be >= 0, got {std}")
        self.std, self.mean, self.seed = float(std), float(mean), int(seed)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for index, key in enumerate(self.key_iterator(d)):
            d[key] = add_gaussian_noise(d[key], self.mean, self.std, self.seed + index)
        return d

    def params(self) -> dict[str, Any]:
        return {"std": self.std, "mean": self.mean, "seed": self.seed}


def _symmetric_range(value: float | Sequence[float], name: str, owner: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{owner}: {name} must be >= 0 (or a (low, high) pair), got {value}")
        return -float(value), float(value)
    low, high = (float(v) for v in value)
    if low > high:
        raise ValueError(f"{owner}: {name} must be (low, high) with low <= high, got {value}")
    return low, high


class RandScaleIntensityd(RandomTransform):
    """With probability ``prob`` multiply by ``1 + f``, ``f ~ U(factors)``; ``f`` alone is ±f."""

    def __init__(
        self,
        keys: str | Sequence[str],
        *,
        factors: float | Sequence[float],
        prob: float = 0.1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob=prob, allow_missing_keys=allow_missing_keys)
        self.factors = _symmetric_range(factors, "factors", "RandScaleIntensityd")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if not self.should_apply():
            return dict(data)
        factor = self.uniform(*self.factors)
        twin = ScaleIntensityd(self.keys, factor, allow_missing_keys=self.allow_missing_keys)
        return twin(data)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "factors": list(self.factors)}


class RandShiftIntensityd(RandomTransform):
    """With probability ``prob`` add ``o ~ U(offsets)``; a single number ``o`` means ±o."""

    def __init__(
        self,
        keys: str | Sequence[str],
        *,
        offsets: float | Sequence[float],
        prob: float = 0.1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob=prob, allow_missing_keys=allow_missing_keys)
        self.offsets = _symmetric_range(offsets, "offsets", "RandShiftIntensityd")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if not self.should_apply():
            return dict(data)
        offset = self.uniform(*self.offsets)
        twin = ShiftIntensityd(self.keys, offset, allow_missing_keys=self.allow_missing_keys)
        return twin(data)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "offsets": list(self.offsets)}


class RandGaussianNoised(RandomTransform):
    """With probability ``prob`` add ``N(mean, s)`` noise, ``s ~ U(0, std)`` (MONAI's default)."""

    def __init__(
        self,
        keys: str | Sequence[str],
        *,
        prob: float = 0.1,
        mean: float = 0.0,
        std: float = 0.1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob=prob, allow_missing_keys=allow_missing_keys)
        if std < 0:
            raise ValueError(f"RandGaussianNoised: std must be >= 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if not self.should_apply():
            return dict(data)
        std = self.uniform(0.0, self.std)
        seed = self.randint(0, 2**31 - 1)
        twin = GaussianNoised(
            self.keys,
            std=std,
            mean=self.mean,
            seed=seed,
            allow_missing_keys=self.allow_missing_keys,
        )
        return twin(data)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "mean": self.mean, "std": self.std}
