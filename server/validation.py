"""Check a site's reply before it may touch the global model.

A reply is refused, with a reason the server logs and writes to ``metrics.jsonl``, when:

- its arrays do not match the arrays that were sent (keys, shapes, dtypes) or hold NaN or
  infinity;
- it moves the model's trainable parameters further than the update bound (L2):
  ``max-update-norm`` when set, else the default rule of :func:`default_update_bound`
  (batch-norm running statistics are data, not learned: they are checked to be finite, and
  variances non-negative, but not bounded in norm);
- its metrics are not a small set of finite numbers under short identifier keys
  (:func:`fedmed.text.is_identifier`; at most :data:`MAX_METRICS`);
- its aggregation weight ``num-examples`` (training cases by default, see
  :mod:`fedmed.runsettings.settings` ``aggregation-weight``) is not a positive finite number, not a
  whole number where cases are counted, or more than the site announced when it joined (the
  roster's ``num-train-cases``): a site cannot buy itself a larger share of the average.

The default update bound: a site's update of the trainable parameters may be at most
``UPDATE_BOUND_FACTOR`` times as long as those parameters of the global model it was sent (at
least ``UPDATE_BOUND_FACTOR``), plus three times the expected length of site-level DP noise
(``sigma * C * sqrt(d)`` for ``d`` noised values) when site-level DP is on. Ordinary local
training moves a model by a fraction of its own length (measured: COPLE-Net 16..256 at the
demo's settings, one epoch per round at lr 1e-3, moved its parameters by 10-14 % of their
length in each of its first three rounds at two sites); an update that replaces the model with
an attacker's is about as long as the two models together. Under SecAgg+ the server never sees
a single update and the bound does not apply (the sites clip instead).

Example:
    >>> import numpy as np
    >>> sent = {"w": np.zeros(3, np.float32)}
    >>> check_reply({"w": np.ones(3, np.float32)}, {"num-examples": 4.0}, sent,
    ...             max_update_norm=5.0, max_weight=10)
    4.0
    >>> check_reply({"w": np.ones(2, np.float32)}, {"num-examples": 4.0}, sent,
    ...             max_update_norm=5.0, max_weight=10)
    Traceback (most recent call last):
    ...
    fedmed.server.validation.InvalidReply: array 'w' has shape (2,) but the global model has (3,)
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from fedmed.text import is_identifier, printable

__all__ = [
    "MAX_METRICS",
    "UPDATE_BOUND_FACTOR",
    "InvalidReply",
    "check_arrays",
    "check_metrics",
    "check_reply",
    "default_update_bound",
    "model_norm",
    "update_norm",
]

MAX_METRICS = 64  # scalar metrics a reply may carry
UPDATE_BOUND_FACTOR = 2.0
_MAX_LIST = 1024  # values in one list-valued metric


class InvalidReply(ValueError):
    """A site's reply cannot be aggregated; ``str(err)`` is the reason that gets logged."""


def check_arrays(
    arrays: Mapping[str, np.ndarray],
    sent: Mapping[str, np.ndarray],
    *,
    nonnegative_variances: bool = True,
) -> None:
    """Raise InvalidReply unless ``arrays`` has exactly the keys, shapes and dtypes of ``sent``,
    only finite values and (``nonnegative_variances``) no negative batch-norm variance; under
    site-level DP the noised variances may be negative and the aggregate is clamped instead."""
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
        if nonnegative_variances and key.endswith("running_var") and (arr < 0).any():
            raise InvalidReply(f"array {key!r} holds negative variances")


def _squared_sum(arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> float:
    total = 0.0
    for key, ref in sent.items():
        if np.issubdtype(ref.dtype, np.floating):
            flat = arrays[key].astype(np.float64).ravel()
            total += float(np.dot(flat, flat))
    return total


def _selected(
    arrays: Mapping[str, np.ndarray], keys: Collection[str] | None
) -> dict[str, np.ndarray]:
    return {k: v for k, v in arrays.items() if keys is None or k in keys}


def update_norm(
    arrays: Mapping[str, np.ndarray],
    sent: Mapping[str, np.ndarray],
    *,
    keys: Collection[str] | None = None,
) -> float:
    """L2 norm of ``arrays - sent`` over the floating-point arrays named in ``keys`` (default:
    all of them; integer buffers such as ``num_batches_tracked`` are always left out)."""
    diff = {
        k: arrays[k].astype(np.float64) - ref.astype(np.float64)
        for k, ref in _selected(sent, keys).items()
        if np.issubdtype(ref.dtype, np.floating)
    }
    return math.sqrt(_squared_sum(diff, diff))


def model_norm(arrays: Mapping[str, np.ndarray], *, keys: Collection[str] | None = None) -> float:
    """L2 norm of the floating-point arrays of a model (those in ``keys``, default all)."""
    chosen = _selected(arrays, keys)
    return math.sqrt(_squared_sum(chosen, chosen))


def default_update_bound(
    sent: Mapping[str, np.ndarray],
    *,
    keys: Collection[str] | None = None,
    dp_noise_norm: float = 0.0,
) -> float:
    """The update bound when ``max-update-norm`` is not set (see the module docstring); ``keys``
    are the trainable parameters' keys."""
    return UPDATE_BOUND_FACTOR * max(1.0, model_norm(sent, keys=keys)) + 3.0 * dp_noise_norm


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidReply(f"metric {key!r} is not a number: {printable(value, limit=60)}")
    if not math.isfinite(value):
        raise InvalidReply(f"metric {key!r} is not finite: {value!r}")
    return float(value)


def check_metrics(
    metrics: Mapping[str, Any], *, max_weight: float | None = None, whole_weight: bool = True
) -> float:
    """Return the aggregation weight ``num-examples``; raise InvalidReply for a bad key, a
    value that is not a finite number, or a weight that is missing, not positive, not whole
    (``whole_weight``) or above ``max_weight``."""
    if len(metrics) > MAX_METRICS:
        raise InvalidReply(f"the reply holds {len(metrics)} metrics: at most {MAX_METRICS}")
    for key, value in metrics.items():
        if not is_identifier(key):
            raise InvalidReply(
                f"metric key {printable(key, limit=60)!r} is not 1-64 letters, digits or _.:@+-"
            )
        values = value if isinstance(value, list) else [value]
        if len(values) > _MAX_LIST:
            raise InvalidReply(f"metric {key!r} lists {len(values)} values: at most {_MAX_LIST}")
        for item in values:
            _number(key, item)
    if "num-examples" not in metrics:
        raise InvalidReply("metrics lack 'num-examples' (the site's aggregation weight)")
    raw = metrics["num-examples"]
    weight = _number("num-examples", raw) if not isinstance(raw, list) else -1.0
    if weight <= 0 or (whole_weight and weight != int(weight)):
        kind = "positive whole number" if whole_weight else "positive number"
        raise InvalidReply(f"metric 'num-examples' must be a {kind}, got {raw!r}")
    if max_weight is not None and weight > max_weight:
        raise InvalidReply(
            f"metric 'num-examples' claims {weight:g} but the site announced {max_weight:g} "
            "when it joined"
        )
    return weight


def check_reply(
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, Any],
    sent: Mapping[str, np.ndarray],
    *,
    max_update_norm: float,
    max_weight: float | None = None,
    whole_weight: bool = True,
    norm_keys: Collection[str] | None = None,
    noised: bool = False,
) -> float:
    """Run every check; return the aggregation weight. ``max_update_norm`` 0 means no bound;
    ``norm_keys`` are the arrays it bounds (the trainable parameters; default all); ``noised``:
    the update carries site-level DP noise (variances may dip below 0)."""
    check_arrays(arrays, sent, nonnegative_variances=not noised)
    weight = check_metrics(metrics, max_weight=max_weight, whole_weight=whole_weight)
    if max_update_norm > 0:
        norm = update_norm(arrays, sent, keys=norm_keys)
        if norm > max_update_norm:
            raise InvalidReply(
                f"update norm {norm:.4g} exceeds the update bound {max_update_norm:.4g} "
                "(max-update-norm)"
            )
    return weight


def _few(keys: list[str]) -> str:
    if not keys:
        return "none"
    shown = ", ".join(repr(printable(k, limit=60)) for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
