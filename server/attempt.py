"""One round attempt without SecAgg+: a train message to each site, every reply checked alone.

Whatever one site sends, it can only lose its own reply: any failure while reading it (a site
error, records that are not fedmed's, a packed payload that does not match its index, metrics
that are not small finite numbers, a weight above what the site announced, an update beyond
the bound; or an exception nobody foresaw) rejects that reply with a reason that is logged and
written to ``metrics.jsonl`` (escaped and bounded, :mod:`fedmed.text`); the attempt goes on.

Example:
    >>> record, updates = run_plain_attempt(exchange, 1, 1, {11: "A"}, sent, cfg, {}, bounds)
    >>> record["sites"]["A"]["num-examples"]
    12.0
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedmed import wire
from fedmed.roundconfig import TrainConfig
from fedmed.scaffold import split_controls
from fedmed.text import printable

from .aggregate import SiteUpdate
from .report import attempt_record
from .validation import InvalidReply, check_reply

__all__ = ["ReplyBounds", "parse_train_reply", "run_plain_attempt"]

logger = logging.getLogger(__name__)

_REPLY_RECORDS = {wire.ARRAYS, wire.INDEX, "metrics"}
Exchange = Callable[[list[Message], float], Mapping[int, Message]]


@dataclass(frozen=True)
class ReplyBounds:
    """What a reply may claim: the update bound (0 = none) over ``norm_keys`` (the trainable
    parameters), the largest aggregation weight per node (what each site announced; a node
    without one may claim nothing), and whether weights are whole numbers (cases)."""

    max_update_norm: float
    max_weight: Mapping[int, float]
    whole_weight: bool = True
    norm_keys: frozenset[str] | None = None
    noised: bool = False


def parse_train_reply(
    reply: Message,
    name: str,
    sent: Mapping[str, np.ndarray],
    *,
    max_update_norm: float,
    max_weight: float | None,
    whole_weight: bool = True,
    norm_keys: frozenset[str] | None = None,
    noised: bool = False,
) -> SiteUpdate:
    """The :class:`SiteUpdate` of one train reply; InvalidReply (with a printable reason)
    for anything wrong with it, whatever the cause."""
    bounds = ReplyBounds(max_update_norm, {}, whole_weight, norm_keys, noised)
    try:
        return _parse(reply, name, sent, bounds, max_weight)
    except InvalidReply:
        raise
    except Exception as err:  # a reply no check foresaw must not end the run
        raise InvalidReply(f"unreadable reply ({type(err).__name__}: {printable(err)})") from err


def _parse(
    reply: Message,
    name: str,
    sent: Mapping[str, np.ndarray],
    bounds: ReplyBounds,
    max_weight: float | None,
) -> SiteUpdate:
    if reply.has_error():
        raise InvalidReply(
            f"site error {printable(reply.error.code, limit=20)}: {printable(reply.error.reason)}"
        )
    content = reply.content
    if set(content) != _REPLY_RECORDS or "metrics" not in content.metric_records:
        raise InvalidReply(
            f"reply must hold exactly ArrayRecord {wire.ARRAYS!r}, ConfigRecord "
            f"{wire.INDEX!r} and MetricRecord 'metrics', got "
            f"{printable(sorted(content), limit=120)}"
        )
    try:
        arrays = wire.unpack_content(content)
    except wire.WireError as err:
        raise InvalidReply(f"packed arrays: {printable(err)}") from err
    metrics = dict(content.metric_records["metrics"])
    model_sent, _ = split_controls(sent)
    model, controls = split_controls(arrays)
    weight = check_reply(
        model,
        metrics,
        model_sent,
        max_update_norm=bounds.max_update_norm,
        max_weight=max_weight,
        whole_weight=bounds.whole_weight,
        norm_keys=bounds.norm_keys,
        noised=bounds.noised,
    )
    _, sent_controls = split_controls(sent)
    if sent_controls:  # SCAFFOLD: the control-variate change, same keys as the server's
        check_reply(controls, {"num-examples": 1}, sent_controls, max_update_norm=0.0)
    scalars = {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
    return SiteUpdate(name, model, weight, scalars, controls)


def run_plain_attempt(
    exchange: Exchange,
    server_round: int,
    attempt: int,
    names: Mapping[int, str],
    sent: Mapping[str, np.ndarray],
    cfg: TrainConfig,
    extras: Mapping[str, Mapping[str, Any]],
    bounds: ReplyBounds,
    *,
    timeout: float,
) -> tuple[dict[str, Any], list[SiteUpdate]]:
    """Send ``sent`` to every node of ``names`` and check each reply on its own; return the
    attempt's log record and the valid updates."""
    content = RecordDict(
        {
            **wire.pack(sent),  # all arrays in one Flower object: see fedmed.wire
            "config": ConfigRecord(cfg.to_config()),
            **{name: ConfigRecord(values) for name, values in extras.items()},
        }
    )
    group = f"round-{server_round}.{attempt}"
    messages = [
        Message(content, node, MessageType.TRAIN, group_id=group, ttl=timeout) for node in names
    ]
    replies = exchange(messages, timeout)
    record = attempt_record(server_round, attempt)
    updates: list[SiteUpdate] = []
    for node, name in names.items():
        reply = replies.get(node)
        if reply is None:
            record["missing"].append(name)
            logger.warning("round %d: site %s did not reply in time", server_round, name)
            continue
        try:
            update = parse_train_reply(
                reply,
                name,
                sent,
                max_update_norm=bounds.max_update_norm,
                max_weight=bounds.max_weight.get(node, 0.0),
                whole_weight=bounds.whole_weight,
                norm_keys=bounds.norm_keys,
                noised=bounds.noised,
            )
        except InvalidReply as err:
            record["rejected"][name] = str(err)
            logger.warning("round %d: reply of site %s dropped: %s", server_round, name, err)
            continue
        updates.append(update)
        record["sites"][name] = dict(update.metrics)
    return record, updates
