"""Secure aggregation (SecAgg+) of a round: the server learns only the weighted mean update.

Flower 1.41 has SecAgg+ only on its legacy path (``SecAggPlusWorkflow`` driving a legacy
``Strategy`` through a ``LegacyContext``: :func:`fedmed.flower.secaggplus.run_secaggplus`).
fedmed keeps its own round loop and runs the workflow for the train stage of a round only:

1. the global arrays travel as one legacy ``FitIns`` parameter, packed by
   :func:`fedmed.wire.pack_array` (its index and the round's ConfigRecords ``signature``/
   ``privacy`` flattened into the config, see :func:`fedmed.security.secagg.flatten_records`);
2. each site trains as usual and hands its *update* (trained minus received, one flat vector)
   and its number of training samples to Flower's ``secaggplus_mod``
   (:mod:`fedmed.security.secagg`), which quantizes ``weight * update`` and masks it with
   pairwise and private masks;
3. the server sums the masked vectors; only the unmasked sum, i.e. the weighted mean update,
   ever exists here. Per-site scalar metrics still come back in the clear (they always do).

Updates, not weights, are aggregated: they are small, so SecAgg+'s clipping range (default
+-8 for ``weight/max_weight * update``) costs nothing, while raw weights (BatchNorm variances,
step counters) could exceed it. Quantization rounds each site's weighted value to
``2 * clip / (2**22 - 1)``; the mean is exact up to ``sites * step / sum(weights / max_weight)``
per value (:func:`fedmed.security.secagg.quantization_tolerance`).

What SecAgg+ cannot coexist with (refused in :class:`~.settings.RunSettings`): fewer than 3
sites, per-update robust strategies (median, trimmed mean) and the server-side update-norm
bound. Dropouts after key sharing are recovered from the other sites' shares as long as the
reconstruction threshold (two thirds of the shares) is met; a sum of fewer than ``min-sites``
sites is never unmasked (a retry with more sites would otherwise reveal the difference): the
attempt fails and the round is retried like any other failed round.

Costs (bench/federation.py): each of the four stages is one message per site and may wait up to
``round-timeout`` (polled by :class:`.polling.PollingGrid`); the masked vector is int64 (the
model is float32), so a site uploads about 2.1x the model (measured: 2.10x COPLE-Net, 2.19x
3D U-Net).

Example:
    >>> result = SecureRound(grid, settings).run(1, nodes, sent, config, extras)
    >>> result.mean_update["head.weight"].shape
    (2, 16, 1, 1)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from fedmed import wire
from fedmed.errors import FederationError
from fedmed.flower.secaggplus import run_secaggplus
from fedmed.runsettings import RunSettings
from fedmed.security.secagg import QUANTIZATION_RANGE, flatten_records, split_update

from .aggregate import SiteUpdate
from .polling import PollingGrid
from .report import attempt_record

__all__ = ["SecureRound", "SecureRoundResult", "apply_update"]

logger = logging.getLogger(__name__)


@dataclass
class SecureRoundResult:
    """What a secure round reveals: the weighted mean update and each site's scalar metrics."""

    mean_update: dict[str, np.ndarray] | None
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def contributors(self) -> int:
        return len(self.metrics) if self.mean_update is not None else 0


class SecureRound:
    """Runs the train stage of one round under SecAgg+ on ``grid``.

    Example:
        >>> result = SecureRound(grid, RunSettings(secure_aggregation=True, min_sites=3)).run(
        ...     1, [11, 12, 13], global_arrays, config, {})
        >>> result.contributors
        3
    """

    def __init__(self, grid: Grid, settings: RunSettings) -> None:
        self.grid = grid
        self.settings = settings

    def run(
        self,
        server_round: int,
        nodes: Sequence[int],
        sent: Mapping[str, np.ndarray],
        config: Mapping[str, Any],
        records: Mapping[str, Mapping[str, Any]],
    ) -> SecureRoundResult:
        """Send ``sent`` to ``nodes``; the mean update (None when the protocol halted)."""
        started = time.monotonic()
        payload, index = wire.pack_array(sent)
        outcome = run_secaggplus(
            PollingGrid(self.grid, self.settings.poll_interval),  # type: ignore[arg-type]
            server_round=server_round,
            nodes=nodes,
            payload=payload,
            config=flatten_records(config, index, records),
            min_contributors=self.settings.min_sites,
            max_weight=self.settings.secagg_max_weight,
            clipping_range=self.settings.secagg_clip_range,
            quantization_range=QUANTIZATION_RANGE,
            timeout=self.settings.round_timeout,
            run_id=int(getattr(getattr(self.grid, "run", None), "run_id", 0) or 0),
        )
        result = SecureRoundResult(None, failures=outcome.failures)
        if outcome.aggregate is not None:
            # Fatal, not a failed attempt: a sum was unmasked, and a retry over overlapping sites
            # would unmask another one (their difference is a site's update).
            try:
                if len(outcome.aggregate) != 1:
                    raise ValueError(
                        f"the aggregate holds {len(outcome.aggregate)} vectors, expected one"
                    )
                result.mean_update = split_update(outcome.aggregate[0], sent)
            except ValueError as err:
                raise FederationError(
                    f"round {server_round}: the securely aggregated update does not fit the "
                    f"model ({err}); the run stops rather than unmask another sum: run the "
                    "same fedmed version at the server and every site"
                ) from err
            result.metrics = outcome.metrics
        result.seconds = time.monotonic() - started
        logger.info(
            "round %d: secure aggregation of %d of %d sites in %.1f s%s",
            server_round,
            result.contributors,
            len(nodes),
            result.seconds,
            f" ({len(result.failures)} failures: {'; '.join(result.failures)})"
            if result.failures
            else "",
        )
        return result

    def attempt(
        self,
        server_round: int,
        attempt: int,
        names: Mapping[int, str],
        sent: Mapping[str, np.ndarray],
        config: Mapping[str, Any],
        records: Mapping[str, Mapping[str, Any]],
    ) -> tuple[dict[str, Any], list[SiteUpdate]]:
        """One round attempt for the federation loop: its log record and the one update.

        ``names`` maps the asked node ids to site names. The update (if any) is the global
        arrays moved by the mean update, weighted by the sites' training samples; the record's
        ``contributors`` says how many sites it holds.
        """
        result = self.run(server_round, list(names), sent, config, records)
        record = {**attempt_record(server_round, attempt), "secure-aggregation": True}
        for node, name in names.items():
            if node in result.metrics:
                record["sites"][name] = result.metrics[node]
            else:
                record["missing"].append(name)
        updates: list[SiteUpdate] = []
        if result.mean_update is None:
            reason = "; ".join(result.failures) or "too few sites answered"
            record["rejected"]["secure-aggregate"] = f"SecAgg+ halted: {reason}"
        elif not all(np.all(np.isfinite(v)) for v in result.mean_update.values()):
            record["rejected"]["secure-aggregate"] = "the aggregate holds NaN or Inf values"
        else:
            total = sum(m.get("num-examples", 0.0) for m in result.metrics.values())
            merged = apply_update(sent, result.mean_update)
            updates.append(SiteUpdate("secure-aggregate", merged, total, {}))
        record["contributors"] = result.contributors if updates else 0
        if record["rejected"]:
            logger.warning("round %d: %s", server_round, record["rejected"]["secure-aggregate"])
        return record, updates


def apply_update(
    weights: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``weights + update`` in each array's own dtype (integer counters rounded)."""
    out = {}
    for key, value in weights.items():
        moved = value.astype(np.float64) + update[key]
        if np.issubdtype(value.dtype, np.integer):
            moved = np.rint(moved)
        out[key] = moved.astype(value.dtype)
    return out
