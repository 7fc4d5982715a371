"""The contract every fedmed dict transform keeps, and ``Compose``.

Data items are dicts in MONAI's key convention: ``d["image"]`` is a channel-first float tensor
``(C, X, Y, Z)`` (or ``(C, H, W)`` for 2D slices), ``d["label"]`` a channel-first integer tensor,
and ``d[f"{key}_meta"]`` a plain dict of metadata:

====================  ============================================================
``affine``            ``torch.float64`` (4, 4) voxel -> world (RAS mm) of the tensor now
``original_affine``   the affine as read from the file
``original_shape``    the spatial shape as read from the file (list of int)
``spacing``           voxel size in mm of the tensor now (list of float)
``filename``          the source file, for error messages (never sent off site)
``history``           the deterministic spatial steps applied, ``[{"name", "params"}]``
====================  ============================================================

A random transform samples its parameters and delegates to a deterministic twin (TorchIO's
split), so only deterministic steps appear in ``history`` and each has an ``inverse()``.

Caching datasets rely on two attributes: ``is_random`` (the deterministic prefix of a
``Compose`` ends at the first random transform, or at the first callable that is not a
fedmed transform, e.g. a lambda or a MONAI transform) and ``config()`` (a JSON-able dict
of everything that changes the output; it is hashed into the cache key).

Example:
    >>> pipeline = Compose([LoadImaged(("image", "label")), RandFlipd(("image", "label"))])
    >>> prefix, rest = pipeline.split_deterministic()
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch

from fedmed.errors import DataError
from fedmed.transforms.meta import get_meta, meta_key, pop_step

__all__ = [
    "Compose",
    "Inverted",
    "InvertibleTransform",
    "MapTransform",
    "RandomTransform",
    "is_deterministic",
    "undo_last_step",
]


class MapTransform:
    """Base of dict transforms: applies to ``keys`` of a data dict and returns a new dict.

    Subclasses implement ``__call__`` and list their parameters in ``config()``.
    """

    is_random: ClassVar[bool] = False

    def __init__(self, keys: str | Sequence[str], *, allow_missing_keys: bool = False) -> None:
        self.keys: tuple[str, ...] = (keys,) if isinstance(keys, str) else tuple(keys)
        if not self.keys:
            raise ValueError(f"{type(self).__name__} needs at least one key")
        self.allow_missing_keys = allow_missing_keys

    def key_iterator(self, data: Mapping[Hashable, Any]) -> Iterator[str]:
        """Yield the keys present in ``data``; a missing key raises unless allowed."""
        for key in self.keys:
            if key in data:
                yield key
            elif not self.allow_missing_keys:
                raise DataError(
                    f"{type(self).__name__}: key {key!r} is not in the data item "
                    f"(keys: {sorted(map(str, data))}); fix the keys or pass "
                    "allow_missing_keys=True"
                )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """JSON-able parameters that change this transform's output (besides the keys)."""
        return {}

    def config(self) -> dict[str, Any]:
        """Everything that changes the output, as JSON-able data (hashed into cache keys)."""
        return {
            "name": type(self).__name__,
            "keys": list(self.keys),
            "allow_missing_keys": self.allow_missing_keys,
            **self.params(),
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class InvertibleTransform(MapTransform):
    """A deterministic spatial transform that records itself in the history and can be undone.

    Each application appends ``{"name": <class name>, "params": {...}}`` to the key's
    ``history``, with the *applied* parameters (the crop box, the permutation found for this
    file...), so ``undo`` can reverse it for that item alone. Subclasses register by name,
    which is how :func:`~fedmed.transforms.invert.invert` replays a history.

    Example:
        >>> item = SpatialPadd("image", (96, 96, 96))(item)
        >>> item = SpatialPadd("image", (96, 96, 96)).inverse()(item)   # shape and affine back
    """

    registry: ClassVar[dict[str, type[InvertibleTransform]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        InvertibleTransform.registry[cls.__name__] = cls

    @classmethod
    def undo(cls, x: torch.Tensor, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse one recorded application on ``x``: ``(restored, index map of the undo)``."""
        raise NotImplementedError

    def inverse(self) -> MapTransform:
        """The transform that undoes this one's last application (shape, values and affine)."""
        return Inverted(self)


def undo_last_step(
    x: torch.Tensor, meta: Mapping[str, Any], *, expect: str | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Undo the last step in ``meta["history"]`` on ``x``; returns the tensor and a new meta."""
    history = meta.get("history") or []
    if not history:
        raise DataError(f"{meta.get('filename', 'item')}: no recorded spatial step to undo")
    step = history[-1]
    if expect is not None and step["name"] != expect:
        raise DataError(
            f"{meta.get('filename', 'item')}: the last recorded step is {step['name']!r}, not "
            f"{expect!r}; undo steps in the reverse order they were applied"
        )
    cls = InvertibleTransform.registry.get(step["name"])
    if cls is None:
        raise DataError(f"{step['name']!r} in the history is not a known invertible transform")
    restored, index_map = cls.undo(x, step["params"])
    return restored, pop_step(meta, index_map)


class Inverted(MapTransform):
    """Undo the last application of ``transform`` on each of its keys (see ``inverse()``)."""

    def __init__(self, transform: InvertibleTransform) -> None:
        super().__init__(transform.keys, allow_missing_keys=transform.allow_missing_keys)
        self.transform = transform

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        who = type(self.transform).__name__
        for key in self.key_iterator(d):
            meta = get_meta(d, key, f"{who}.inverse()")
            d[key], d[meta_key(key)] = undo_last_step(d[key], meta, expect=who)
        return d

    def params(self) -> dict[str, Any]:
        return {"inverse_of": self.transform.config()}


class RandomTransform(MapTransform):
    """A transform that samples parameters, then applies a deterministic twin.

    ``prob`` is the chance to apply at all. Seed with :meth:`set_random_state` for
    reproducible pipelines; without a seed each instance draws from its own generator.
    """

    is_random: ClassVar[bool] = True

    def __init__(
        self, keys: str | Sequence[str], *, prob: float = 1.0, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys=allow_missing_keys)
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"{type(self).__name__}: prob must be in [0, 1], got {prob}")
        self.prob = prob
        self.generator = torch.Generator()
        self.generator.seed()

    def set_random_state(self, seed: int) -> RandomTransform:
        """Seed this transform's generator; returns ``self`` for chaining."""
        self.generator.manual_seed(int(seed))
        return self

    def should_apply(self) -> bool:
        """Draw whether to apply this time (consumes one number from the generator)."""
        return bool(torch.rand((), generator=self.generator).item() < self.prob)

    def uniform(self, low: float, high: float) -> float:
        """One float drawn uniformly from ``[low, high)``."""
        return low + (high - low) * float(torch.rand((), generator=self.generator).item())

    def randint(self, low: int, high: int) -> int:
        """One int drawn uniformly from ``[low, high)``."""
        return int(torch.randint(low, high, (), generator=self.generator).item())

    def params(self) -> dict[str, Any]:
        return {"prob": self.prob}


def is_deterministic(transform: Callable[..., Any]) -> bool:
    """True for fedmed transforms that are not random; unknown callables count as random."""
    return isinstance(transform, MapTransform) and not transform.is_random


class Compose:
    """Apply transforms in order; split into the cacheable deterministic prefix and the rest.

    Example:
        >>> prefix, rest = Compose([load, orient, window, crop_by_label]).split_deterministic()
        >>> item = rest(prefix(case))
    """

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms: tuple[Callable[[Any], Any], ...] = tuple(transforms)

    def __call__(self, data: Any) -> Any:
        """Apply each transform; after one returns a list of samples (a patch sampler), the
        following transforms run on every sample and the result is one flat list (MONAI's rule).
        """
        for transform in self.transforms:
            if isinstance(data, list):
                out: list[Any] = []
                for sample in data:
                    result = transform(sample)
                    out.extend(result if isinstance(result, list) else [result])
                data = out
            else:
                data = transform(data)
        return data

    def __len__(self) -> int:
        return len(self.transforms)

    def split_deterministic(self) -> tuple[Compose, Compose]:
        """``(prefix, rest)``: the prefix ends at the first random or unknown callable."""
        cut = len(self.transforms)
        for index, transform in enumerate(self.transforms):
            if not is_deterministic(transform):
                cut = index
                break
        return Compose(self.transforms[:cut]), Compose(self.transforms[cut:])

    def set_random_state(self, seed: int) -> Compose:
        """Seed every random fedmed transform, each from ``seed`` plus its position."""
        for index, transform in enumerate(self.transforms):
            if isinstance(transform, RandomTransform):
                transform.set_random_state(seed + index)
        return self

    def config(self) -> list[dict[str, Any]]:
        """The config of every transform; only meaningful for the deterministic prefix."""
        configs = []
        for transform in self.transforms:
            if not isinstance(transform, MapTransform):
                raise TypeError(f"{transform!r} is not a fedmed transform and has no config")
            configs.append(transform.config())
        return configs

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(t) for t in self.transforms)
        return f"Compose([\n  {inner}\n])"
