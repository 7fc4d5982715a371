"""Flower's SecAgg+ on its legacy path, reduced to one call per side.

Flower 1.41 has SecAgg+ only on its legacy path: the server drives ``SecAggPlusWorkflow`` with a
legacy ``Strategy`` through a ``LegacyContext``, and sites answer through the legacy
``secaggplus_mod`` over ``FitIns``/``FitRes`` records. This module keeps those internals in one
place:

* server: :func:`run_secaggplus` runs the four stages (setup, share keys, collect masked
  vectors, unmask) of one train round with fixed sites and one ``FitIns``, never unmasking a sum
  of fewer than ``min_contributors`` sites, and returns the unmasked aggregate (the sites'
  weighted mean) and each site's scalar metrics;
* site: :func:`secaggplus_site` answers one stage; at the masked-vector stage it calls the
  site's ``train(payloads, config, context)`` and hands Flower's mod the vector and weight it
  returns. :func:`is_secaggplus_message` tells a SecAgg+ stage from a plain message and
  :func:`secaggplus_state` reads the protocol state the mod keeps in the context.

What travels and what it means is fedmed's (:mod:`fedmed.security.secagg`,
:mod:`fedmed.server.secagg`). Uses Flower internals; ``tests/flower/test_flower_contract.py`` checks
them and ``tests/e2e/test_secure_aggregation.py`` runs the protocol.

Example:
    >>> outcome = run_secaggplus(grid, server_round=1, nodes=[11, 12, 13], payload=flat,
    ...                          config={"lr": 0.01}, min_contributors=3, max_weight=1000.0,
    ...                          clipping_range=8.0, quantization_range=2**22, timeout=60.0)
    >>> outcome.aggregate[0].shape
    (1234,)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

__all__ = [
    "SecAggPlusOutcome",
    "SiteStageFn",
    "is_secaggplus_message",
    "run_secaggplus",
    "secaggplus_site",
    "secaggplus_state",
]

logger = logging.getLogger(__name__)

RECONSTRUCTION_FRACTION = 2 / 3

# (payload arrays, round config, context) -> (vector to aggregate, weight, scalar metrics)
SiteStageFn = Callable[
    [list[np.ndarray], dict[str, Any], Context], tuple[np.ndarray, int, Mapping[str, float]]
]


@dataclass
class SecAggPlusOutcome:
    """What a secure round reveals: the unmasked aggregate (None when the protocol halted),
    each site's scalar metrics (with ``num-examples``) and why sites or the round failed."""

    aggregate: list[np.ndarray] | None
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


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


def run_secaggplus(
    grid: Grid,
    *,
    server_round: int,
    nodes: Sequence[int],
    payload: np.ndarray,
    config: Mapping[str, Any],
    min_contributors: int,
    max_weight: float,
    clipping_range: float,
    quantization_range: int,
    timeout: float,
    run_id: int = 0,
) -> SecAggPlusOutcome:
    """Run the train stage of one round under SecAgg+: ``payload`` and the legacy ``config``
    (scalars only) go to ``nodes`` as one ``FitIns``.

    A site's failure, or an exception in Flower's workflow (it indexes replies unchecked), ends
    as an entry of ``failures`` and no aggregate: the attempt failed, nothing was unmasked.
    """
    fitins = FitIns(ndarrays_to_parameters([payload]), dict(config))
    proxies: list[ClientProxy] = [GridClientProxy(n, grid, run_id) for n in nodes]
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
        max_weight=max_weight,
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        timeout=timeout,
        min_contributors=min_contributors,
    )
    try:
        workflow(grid, context)
    except Exception as err:  # Flower indexes replies unchecked: a bad one fails the attempt
        logger.exception("round %d: secure aggregation failed", server_round)
        strategy.failures.append(f"{type(err).__name__}: {err}")
        strategy.aggregate = None
    return SecAggPlusOutcome(strategy.aggregate, strategy.metrics, strategy.failures)


def is_secaggplus_message(msg: Message) -> bool:
    """Whether ``msg`` is one of a SecAgg+ round's stages."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secaggplus_state(context: Context) -> Mapping[str, Any] | None:
    """The SecAgg+ state Flower's mod keeps in the site's context (None before the setup)."""
    return context.state.config_records.get(RECORD_KEY_STATE)


def secaggplus_site(msg: Message, context: Context, train: SiteStageFn) -> Message:
    """Answer one SecAgg+ stage; at the masked-vector stage ``train`` runs the local round."""

    def train_and_report(inner: Message, ctx: Context) -> Message:
        fitins = compat.recorddict_to_fitins(inner.content, keep_input=True)
        vector, num_examples, metrics = train(
            parameters_to_ndarrays(fitins.parameters), dict(fitins.config), ctx
        )
        fitres = FitRes(
            Status(Code.OK, "trained"),
            ndarrays_to_parameters([vector]),
            num_examples,
            {k: float(v) for k, v in metrics.items()},
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=inner)

    return secaggplus_mod(msg, context, train_and_report)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _failure_text(failure: Any) -> str:
    if isinstance(failure, BaseException):
        return str(failure) or type(failure).__name__
    return "a site replied with an error status"
