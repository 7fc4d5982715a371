"""Secure aggregation (SecAgg+) of a round: the server learns only the weighted mean update.

Flower 1.41 has SecAgg+ only on its legacy path (``SecAggPlusWorkflow`` driving a legacy
``Strategy`` through a ``LegacyContext``). fedmed keeps its own round loop and
runs the workflow for the train stage of a round only:

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
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedmed import wire
from fedmed.errors import FederationError
from fedmed.security.secagg import QUANTIZATION_RANGE, flatten_records, split_update

from .aggregate import SiteUpdate
from .polling import PollingGrid
from .report import attempt_record
from .settings import RunSettings

__all__ = ["SecureRound", "SecureRoundResult", "apply_update"]

logger = logging.getLogger(__name__)

RECONSTRUCTION_FRACTION = 2 / 3


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


class _OneRoundStrategy(Strategy):
    """The legacy Strategy the workflow drives: fixed sites and FitIns; keeps the aggregate."""

    def __init__(self, proxies: list[ClientProxy], fitins: FitIns) -> None:
        self.proxies = proxies
        self.fitins = fitins
        self.aggregate: list[np.ndarray] | None = None
        self.metrics: dict[int, dict[str, float]] = {}
        self.failures: list[str] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, self.fitins) for proxy in self.proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        self.failures = [_failure_text(f) for f in failures]
        if not results:
            return None, {}
        # the workflow puts the unmasked mean into every result; the metrics are per site
        self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        for proxy, fitres in results:
            metrics = {k: float(v) for k, v in fitres.metrics.items() if _is_number(v)}
            metrics["num-examples"] = float(fitres.num_examples)
            self.metrics[int(proxy.node_id)] = metrics
        return results[0][1].parameters, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class _QuorumSecAggPlus(SecAggPlusWorkflow):
    """SecAgg+ that never unmasks a sum of fewer than ``min_contributors`` sites.

    Flower unmasks whenever the reconstruction threshold is met. A retry of a round that had
    too few contributors may ask overlapping sites, which train the same way again (same global
    model, same seeds), so unmasking A+B and then A+B+C would hand the server C's update: stop
    before unmasking instead.
    """

    def __init__(self, *args: Any, min_contributors: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_contributors = min_contributors

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = super().collect_masked_vectors_stage(grid, context, state)
        if ok and len(state.active_node_ids) < self.min_contributors:
            context.strategy.failures.append(  # type: ignore[attr-defined]
                f"only {len(state.active_node_ids)} sites sent masked updates, min-sites is "
                f"{self.min_contributors}: not unmasked"
            )
            return False
        return ok


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
        fitins = FitIns(ndarrays_to_parameters([payload]), flatten_records(config, index, records))
        run_id = int(getattr(getattr(self.grid, "run", None), "run_id", 0) or 0)
        proxies: list[ClientProxy] = [GridClientProxy(n, self.grid, run_id) for n in nodes]
        strategy = _OneRoundStrategy(proxies, fitins)
        context = LegacyContext(
            Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            strategy=strategy,
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        workflow = _QuorumSecAggPlus(
            num_shares=1.0,
            reconstruction_threshold=RECONSTRUCTION_FRACTION,
            max_weight=self.settings.secagg_max_weight,
            clipping_range=self.settings.secagg_clip_range,
            quantization_range=QUANTIZATION_RANGE,
            timeout=self.settings.round_timeout,
            min_contributors=self.settings.min_sites,
        )
        try:
            workflow(PollingGrid(self.grid, self.settings.poll_interval), context)  # type: ignore[arg-type]
        except Exception as err:  # Flower indexes replies unchecked: a bad one fails the attempt
            logger.exception("round %d: secure aggregation failed", server_round)
            strategy.failures.append(f"{type(err).__name__}: {err}")
            strategy.aggregate = None
        result = SecureRoundResult(None, failures=strategy.failures)
        if strategy.aggregate is not None:
            # Fatal, not a failed attempt: a sum was unmasked, and a retry over overlapping sites
            # would unmask another one (their difference is a site's update).
            try:
                if len(strategy.aggregate) != 1:
                    raise ValueError(
                        f"the aggregate holds {len(strategy.aggregate)} vectors, expected one"
                    )
                result.mean_update = split_update(strategy.aggregate[0], sent)
            except ValueError as err:
                raise FederationError(
                    f"round {server_round}: the securely aggregated update does not fit the "
                    f"model ({err}); the run stops rather than unmask another sum: run the "
                    "same fedmed version at the server and every site"
                ) from err
            result.metrics = strategy.metrics
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _failure_text(failure: Any) -> str:
    if isinstance(failure, BaseException):
        return str(failure) or type(failure).__name__
    return "a site replied with an error status"
