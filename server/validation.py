"""Check a site's reply before it may touch the global model.

A reply is refused, with a reason the server logs and writes to ``metrics.jsonl``, when its
arrays do not match the arrays that were sent (keys, shapes, dtypes), hold NaN or infinity,
move the model further than ``max-update-norm`` (L2 over all floating arrays), or when its
metrics lack a positive integer ``num-examples`` or hold non-finite values.

Example:
    >>> import numpy as np
    >>> sent = {"w": np.zeros(3, np.float32)}
    >>> check_reply({"w": np.ones(3, np.float32)}, {"num-examples": 4.0}, sent,
    ...             max_update_norm=0.0)
    >>> check_reply({"w": np.ones(2, np.float32)}, {"num-examples": 4.0}, sent,
    ...             max_update_norm=0.0)
    Traceback (most recent call last):
    ...
    fedmed.server.validation.InvalidReply: array 'w' has shape (2,) but the global model has (3,)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["InvalidReply", "check_arrays", "check_metrics", "check_reply", "update_norm"]


class InvalidReply(ValueError):
    """A site's reply cannot be aggregated; ``str(err)`` is the reason that gets logged."""


def check_arrays(arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> None:
    """Raise InvalidReply unless ``arrays`` has exactly the keys, shapes and dtypes of ``sent``
    and only finite values."""
    missing = sorted(set(sent) - set(arrays))
    extra = sorted(set(arrays) - set(sent))
    if missing or extra:
        raise InvalidReply(
            f"array keys differ from the global model: missing {_few(missing)}, "
            f"unexpected {_few(extra)}"
        )
    for key, ref in sent.items():
        arr = arrays[key]
        if tuple(arr.shape) != tuple(ref.shape):
            raise InvalidReply(
                f"array {key!r} has shape {tuple(arr.shape)} but the global model has "
                f"{tuple(ref.shape)}"
            )
        if arr.dtype != ref.dtype:
            raise InvalidReply(
                f"array {key!r} has dtype {arr.dtype} but the global model has {ref.dtype}"
            )
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise InvalidReply(f"array {key!r} holds NaN or infinite values")


def update_norm(arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``arrays - sent`` over every floating-point array (buffers such as
    ``num_batches_tracked`` counters are integers and left out)."""
    total = 0.0
    for key, ref in sent.items():
        if np.issubdtype(ref.dtype, np.floating):
            diff = arrays[key].astype(np.float64) - ref.astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def check_metrics(metrics: Mapping[str, float | int | list[float] | list[int]]) -> int:
    """Return ``num-examples`` as an int; raise InvalidReply if it is missing or not a
    positive whole number, or if any metric is not finite."""
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(float(v)) for v in values):
            raise InvalidReply(f"metric {key!r} is not finite: {value!r}")
    if "num-examples" not in metrics:
        raise InvalidReply("metrics lack 'num-examples' (the number of training samples)")
    raw = metrics["num-examples"]
    if isinstance(raw, list) or float(raw) != int(raw) or int(raw) < 1:
        raise InvalidReply(f"metric 'num-examples' must be a positive whole number, got {raw!r}")
    return int(raw)


def check_reply(
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, float | int | list[float] | list[int]],
    sent: Mapping[str, np.ndarray],
    *,
    max_update_norm: float,
) -> int:
    """Run every check; return ``num-examples``. ``max_update_norm`` 0 means no bound."""
    check_arrays(arrays, sent)
    num_examples = check_metrics(metrics)
    if max_update_norm > 0:
        norm = update_norm(arrays, sent)
        if norm > max_update_norm:
            raise InvalidReply(
                f"update norm {norm:.4g} exceeds max-update-norm {max_update_norm:.4g}"
            )
    return num_examples


def _few(keys: list[str]) -> str:
    if not keys:
        return "none"
    shown = ", ".join(repr(k) for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
