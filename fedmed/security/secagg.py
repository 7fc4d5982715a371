"""Secure aggregation at the site, and the message format both sides share.

The server side is :mod:`fedmed.server.secagg`. A SecAgg+ round reaches the site's ``train``
handler as four messages (setup, share keys, collect masked vectors, unmask), each with the
ConfigRecord ``secaggplus_configs``; Flower's ``secaggplus_mod`` runs the protocol
(:func:`fedmed.flower.secaggplus.secaggplus_site`) and, at the
third stage, calls back into the site's normal training (:func:`secure_train`'s ``train``),
then quantizes and masks what it returns. What the site hands to the mod is its *update*
(trained minus received arrays) and its number of training samples (the weight); the mod
clears the plain arrays from the reply before it leaves the site.

The global arrays travel as one legacy ``FitIns`` parameter: fedmed's packed payload
(:func:`fedmed.wire.pack_array`, one Flower object instead of one per array), its index as JSON
in the config key ``fedmed.arrays-index``, and the round's extra ConfigRecords (``signature``,
``privacy``) flattened into the config as ``record::key`` (:func:`flatten_records`), so the site
checks the server's signature and applies DP as in a plain round, except that site-mode DP
adds only this site's share of the noise: the ``privacy`` record of a secure round carries
``dp-secure-sites`` and ``dp-min-secure-sites`` m, and each site adds std ``sigma * C / sqrt(m)``
so the unmasked sum carries at least ``sigma * C`` (:class:`fedmed.security.dp.DpParams`,
``docs/threat-model.md``). The update goes back as one flat float64 vector in sorted key order
(:func:`join_update`), which the server splits into arrays again (:func:`split_update`).

Example:
    >>> arrays = {"w": np.zeros((2, 3))}
    >>> flat = flatten_records({"round": 1}, {"keys": ["w"]}, {"privacy": {"clip-norm": 1.0}})
    >>> split_records(flat)
    ({'round': 1}, {'keys': ['w']}, {'privacy': {'clip-norm': 1.0}})
    >>> split_update(join_update({"w": np.ones((2, 3))}, arrays), arrays)["w"].shape
    (2, 3)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Context, Message

from fedmed import wire
from fedmed.flower.secaggplus import is_secaggplus_message, secaggplus_site, secaggplus_state

__all__ = [
    "INDEX_CONFIG",
    "QUANTIZATION_RANGE",
    "RECORD_SEPARATOR",
    "SiteTrainFn",
    "flatten_records",
    "is_secure_message",
    "join_update",
    "quantization_tolerance",
    "secure_train",
    "split_records",
    "split_update",
]

logger = logging.getLogger(__name__)

INDEX_CONFIG = "fedmed.arrays-index"  # JSON: legacy configs hold scalars only, no lists
RECORD_SEPARATOR = "::"
QUANTIZATION_RANGE = 2**22  # Flower's default; 2**32 / 2**22 leaves room for 1024 sites

# (context, received arrays, round config, extra records) -> (arrays to send, scalar metrics)
SiteTrainFn = Callable[
    [Context, dict[str, np.ndarray], dict[str, Any], dict[str, dict[str, Any]]],
    tuple[Mapping[str, np.ndarray], Mapping[str, float]],
]


def flatten_records(
    config: Mapping[str, Any],
    index: Mapping[str, Any],
    records: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """One legacy config dict: the round config, the packed arrays' index and the extra
    records."""
    flat = dict(config)
    flat[INDEX_CONFIG] = json.dumps(dict(index), separators=(",", ":"))
    for name, values in records.items():
        for key, value in values.items():
            flat[f"{name}{RECORD_SEPARATOR}{key}"] = value
    return flat


def split_records(
    flat: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """Inverse of :func:`flatten_records`: ``(config, arrays index, records)``.

    Raises:
        ValueError: the config carries no (or no readable) arrays index.
    """
    config: dict[str, Any] = {}
    records: dict[str, dict[str, Any]] = {}
    index: Any = None
    for key, value in flat.items():
        if key == INDEX_CONFIG:
            try:
                index = json.loads(str(value))
            except ValueError as err:
                raise ValueError(
                    f"secure round config {INDEX_CONFIG!r} is not JSON: {err}"
                ) from err
        elif RECORD_SEPARATOR in key:
            name, sub = key.split(RECORD_SEPARATOR, 1)
            records.setdefault(name, {})[sub] = value
        else:
            config[key] = value
    if not isinstance(index, dict):
        raise ValueError(
            f"secure round config has no arrays index {INDEX_CONFIG!r}: server and site run "
            "different fedmed versions"
        )
    return config, index, records


def join_update(
    trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]
) -> np.ndarray:
    """``trained - received`` of every array of ``received``, flattened into one float64
    vector in sorted key order: what a site hands to SecAgg+.

    The order is the keys' sorted order, not the message's: the signature covers the arrays by
    name, not the order of the index, so a reordered index cannot scramble the aggregate.

    Raises:
        ValueError: an array is complex (SecAgg+ sums real numbers).
    """
    parts = []
    for key in sorted(received):
        if np.iscomplexobj(received[key]) or np.iscomplexobj(trained[key]):
            raise ValueError(f"array {key!r} is complex: secure aggregation sums real values")
        delta = np.asarray(trained[key], np.float64) - np.asarray(received[key], np.float64)
        parts.append(delta.ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def split_update(flat: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`join_update`: ``flat`` cut into float64 arrays shaped like ``like``.

    Raises:
        ValueError: ``flat`` does not hold exactly as many values as ``like``.
    """
    flat = np.asarray(flat, np.float64).ravel()
    total = sum(math.prod(np.shape(v)) for v in like.values())
    if flat.size != total:
        raise ValueError(
            f"the update holds {flat.size} values but the model has {total}: server and "
            "site run different models or fedmed versions"
        )
    parts, start = {}, 0
    for key in sorted(like):  # join_update's order
        size = math.prod(np.shape(like[key]))
        parts[key] = flat[start : start + size].reshape(np.shape(like[key]))
        start += size
    return {k: parts[k] for k in like}


def quantization_tolerance(
    num_examples: Sequence[float], *, clip_range: float = 8.0, max_weight: float = 1000.0
) -> float:
    """Largest per-value error of the securely aggregated mean update against the exact one.

    Each site's ``n / max_weight * update`` is rounded to a step of
    ``2 * clip_range / (QUANTIZATION_RANGE - 1)``; the sum of those errors is divided by the
    sum of the weights when the server takes the mean.
    """
    step = 2 * clip_range / (QUANTIZATION_RANGE - 1)
    total_ratio = sum(n / max_weight for n in num_examples)
    return len(num_examples) * step / total_ratio


def is_secure_message(msg: Message) -> bool:
    """Whether ``msg`` is one of a SecAgg+ round's stages."""
    return is_secaggplus_message(msg)


def secure_train(msg: Message, context: Context, train: SiteTrainFn) -> Message:
    """Answer one SecAgg+ stage; at the masked-vector stage ``train`` runs the local round."""

    def train_and_report_update(
        payloads: list[np.ndarray], flat: dict[str, Any], ctx: Context
    ) -> tuple[np.ndarray, int, Mapping[str, float]]:
        config, index, records = split_records(flat)
        if len(payloads) != 1:
            raise ValueError(
                f"secure round carries {len(payloads)} arrays, expected one packed payload: "
                "server and site run different fedmed versions"
            )
        received = wire.unpack_array(payloads[0], index)
        sent, metrics = train(ctx, received, config, records)
        update = join_update(sent, received)
        num_examples = int(metrics.get("num-examples", 0))
        _warn_if_clipped(update, ctx, num_examples)
        return update, num_examples, metrics

    return secaggplus_site(msg, context, train_and_report_update)


def _warn_if_clipped(update: np.ndarray, context: Context, num_examples: int) -> None:
    """SecAgg+ clips ``weight * update`` silently: say so in the site's log when it happens."""
    state = secaggplus_state(context)
    if state is None:
        return
    clip = float(state.get("clipping_range", 0.0) or 0.0)
    max_weight = float(state.get("max_weight", 0.0) or 0.0)
    if clip <= 0 or max_weight <= 0:
        return
    ratio = num_examples / max_weight
    largest = float(np.max(np.abs(update))) if update.size else 0.0
    if ratio > 1:
        logger.warning(
            "secure aggregation: %d training samples exceed secagg-max-weight %g: the sum may "
            "overflow; raise secagg-max-weight in the run config",
            num_examples,
            max_weight,
        )
    if largest * ratio > clip:
        logger.warning(
            "secure aggregation: update values up to %.3g (x weight %.3g) exceed "
            "secagg-clip-range %g and are clipped; raise secagg-clip-range",
            largest,
            ratio,
            clip,
        )
