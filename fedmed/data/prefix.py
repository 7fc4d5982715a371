"""What the caching datasets share: split a pipeline, hash its prefix, apply its random rest.

The caching datasets keep the output of the deterministic prefix and run the rest on every
access. The cached item must survive that, so the rule is:

* fedmed transforms (subclasses of :class:`~fedmed.transforms.base.MapTransform`) never mutate
  their input in place: they start with ``d = dict(data)``, replace values instead of writing
  into them, and copy a meta dict before changing it. A rest made only of fedmed transforms gets
  a shallow copy of the cached dict (no tensor is copied).
* any other callable (a lambda, a MONAI transform) may mutate; the rest then gets a deep copy
  (tensors cloned) of the cached item, as MONAI does for every access.

Example:
    >>> prefix, rest = split_transform([load, scale, rand_flip])
    >>> cached = prefix(case)
    >>> sample = apply_rest(rest, cached)  # ``cached`` is unchanged
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedmed.transforms.base import Compose, MapTransform

__all__ = [
    "apply_rest",
    "item_nbytes",
    "prefix_digest",
    "rest_is_safe",
    "split_transform",
]

_CACHE_FORMAT = "fedmed-cache/1"


def split_transform(
    transform: Compose | Sequence[Callable[[Any], Any]] | Callable[[Any], Any] | None,
) -> tuple[Compose, Compose]:
    """``(prefix, rest)`` of a pipeline; a single callable or ``None`` is accepted too."""
    if transform is None:
        return Compose([]), Compose([])
    if isinstance(transform, Compose):
        return transform.split_deterministic()
    if isinstance(transform, Sequence):
        return Compose(transform).split_deterministic()
    return Compose([transform]).split_deterministic()


def prefix_digest(prefix: Compose) -> str:
    """sha256 (hex) of the prefix's config JSON: any changed parameter changes the digest."""
    try:
        text = json.dumps(
            {"format": _CACHE_FORMAT, "prefix": prefix.config()},
            sort_keys=True,
            separators=(",", ":"),
            allow_nan=True,
        )
    except TypeError as err:
        raise TypeError(
            f"a transform's config() is not JSON-able ({err}); return plain data from "
            "params() so the cache key can be computed"
        ) from err
    return hashlib.sha256(text.encode()).hexdigest()


def rest_is_safe(rest: Compose) -> bool:
    """True when every step of ``rest`` is a fedmed transform (none mutates its input)."""
    return all(isinstance(t, MapTransform) for t in rest.transforms)


def apply_rest(rest: Compose, item: Any, *, safe: bool | None = None) -> Any:
    """Run ``rest`` on a cached ``item`` without changing ``item`` (see the module rule)."""
    if safe is None:
        safe = rest_is_safe(rest)
    if not safe:
        data = _deep_copy(item)
    elif isinstance(item, dict):
        data = dict(item)
    else:
        data = item
    return rest(data)


def _deep_copy(item: Any) -> Any:
    if isinstance(item, torch.Tensor):
        return item.clone()
    if isinstance(item, np.ndarray):
        return item.copy()
    if isinstance(item, dict):
        return {k: _deep_copy(v) for k, v in item.items()}
    if isinstance(item, list):
        return [_deep_copy(v) for v in item]
    if isinstance(item, tuple):
        return tuple(_deep_copy(v) for v in item)
    return copy.deepcopy(item)


def item_nbytes(item: Any) -> int:
    """Bytes held by the tensors and arrays in ``item`` (what caching it costs in RAM)."""
    if isinstance(item, torch.Tensor):
        return item.numel() * item.element_size()
    if isinstance(item, np.ndarray):
        return int(item.nbytes)
    if isinstance(item, dict):
        return sum(item_nbytes(v) for v in item.values())
    if isinstance(item, (list, tuple)):
        return sum(item_nbytes(v) for v in item)
    return 0
