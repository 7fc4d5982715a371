"""Secure aggregation at the site, and the message format both sides share.

The server side is :mod:`fedmed.server.secagg`. A SecAgg+ round reaches the site's ``train``
handler as four messages (setup, share keys, collect masked vectors, unmask), each with the
ConfigRecord ``secaggplus_configs``; Flower's ``secaggplus_mod`` runs the protocol and, at the
third stage, calls back into the site's normal training (:func:`secure_train`'s ``train``),
then quantizes and masks what it returns. What the site hands to the mod is its *update*
(trained minus received arrays) and its number of training samples (the weight); the mod
clears the plain arrays from the reply before it leaves the site.

The global arrays travel as legacy ``FitIns`` parameters; their names in order are the config
key ``fedmed.keys`` and the round's extra ConfigRecords (``signature``, ``privacy``) are
flattened into the config as ``record::key`` (:func:`flatten_records`), so the site checks the
server's signature and applies DP exactly as in a plain round.

Example:
    >>> arrays = {"w": np.zeros((2, 3))}
    >>> flat = flatten_records({"server-round": 1}, arrays, {"privacy": {"clip-norm": 1.0}})
    >>> split_records(flat)
    ({'server-round': 1}, {'w': (2, 3)}, {'privacy': {'clip-norm': 1.0}})
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
)

__all__ = [
    "KEYS_CONFIG",
    "QUANTIZATION_RANGE",
    "RECORD_SEPARATOR",
    "SHAPES_CONFIG",
    "SiteTrainFn",
    "flatten_records",
    "is_secure_message",
    "quantization_tolerance",
    "secure_train",
    "split_records",
]

logger = logging.getLogger(__name__)

KEYS_CONFIG = "fedmed.keys"
SHAPES_CONFIG = "fedmed.shapes"  # Flower's legacy path turns 0-d arrays into shape (1,)
RECORD_SEPARATOR = "::"
QUANTIZATION_RANGE = 2**22  # Flower's default; 2**32 / 2**22 leaves room for 1024 sites

# (context, received arrays, round config, extra records) -> (arrays to send, scalar metrics)
SiteTrainFn = Callable[
    [Context, dict[str, np.ndarray], dict[str, Any], dict[str, dict[str, Any]]],
    tuple[Mapping[str, np.ndarray], Mapping[str, float]],
]


def flatten_records(
    config: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    records: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """One legacy config dict: the round config, the arrays' names and shapes in order, and
    the extra records."""
    flat = dict(config)
    flat[KEYS_CONFIG] = ",".join(arrays)
    flat[SHAPES_CONFIG] = ";".join("x".join(str(n) for n in a.shape) for a in arrays.values())
    for name, values in records.items():
        for key, value in values.items():
            flat[f"{name}{RECORD_SEPARATOR}{key}"] = value
    return flat


def split_records(
    flat: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]], dict[str, dict[str, Any]]]:
    """Inverse of :func:`flatten_records`: ``(config, shapes by array name, records)``."""
    config: dict[str, Any] = {}
    records: dict[str, dict[str, Any]] = {}
    keys: list[str] = []
    shapes: list[tuple[int, ...]] = []
    for key, value in flat.items():
        if key == KEYS_CONFIG:
            keys = str(value).split(",") if value else []
        elif key == SHAPES_CONFIG:
            shapes = [tuple(int(n) for n in part.split("x") if n) for part in str(value).split(";")]
        elif RECORD_SEPARATOR in key:
            name, sub = key.split(RECORD_SEPARATOR, 1)
            records.setdefault(name, {})[sub] = value
        else:
            config[key] = value
    if not keys:
        shapes = []
    if len(shapes) != len(keys):
        raise ValueError(
            f"secure round names {len(keys)} arrays but gives {len(shapes)} shapes: server and "
            "site run different fedmed versions"
        )
    return config, dict(zip(keys, shapes, strict=True)), records


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
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secure_train(msg: Message, context: Context, train: SiteTrainFn) -> Message:
    """Answer one SecAgg+ stage; at the masked-vector stage ``train`` runs the local round."""

    def train_and_report_update(inner: Message, ctx: Context) -> Message:
        fitins = compat.recorddict_to_fitins(inner.content, keep_input=True)
        config, shapes, records = split_records(fitins.config)
        arrays = parameters_to_ndarrays(fitins.parameters)
        if len(shapes) != len(arrays):
            raise ValueError(
                f"secure round carries {len(arrays)} arrays but names {len(shapes)}: server and "
                "site run different fedmed versions"
            )
        received = {
            k: a.reshape(shape) for (k, shape), a in zip(shapes.items(), arrays, strict=True)
        }
        keys = list(received)
        sent, metrics = train(ctx, received, config, records)
        # at least 1-d: the masks are drawn per array shape, and a 0-d array comes back 1-d
        update = [
            np.atleast_1d(sent[k].astype(np.float64) - received[k].astype(np.float64)) for k in keys
        ]
        num_examples = int(metrics.get("num-examples", 0))
        _warn_if_clipped(update, ctx, num_examples)
        fitres = FitRes(
            Status(Code.OK, "trained"),
            ndarrays_to_parameters(update),
            num_examples,
            {k: float(v) for k, v in metrics.items()},
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=inner)

    return secaggplus_mod(msg, context, train_and_report_update)


def _warn_if_clipped(update: Sequence[np.ndarray], context: Context, num_examples: int) -> None:
    """SecAgg+ clips ``weight * update`` silently: say so in the site's log when it happens."""
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if state is None:
        return
    clip = float(state.get("clipping_range", 0.0) or 0.0)
    max_weight = float(state.get("max_weight", 0.0) or 0.0)
    if clip <= 0 or max_weight <= 0:
        return
    ratio = num_examples / max_weight
    largest = max((float(np.max(np.abs(u))) for u in update if u.size), default=0.0)
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
