"""The server's round loop on Flower's Grid: one train message per site per round.

Flower's stock ``strategy.start`` sends a train and an evaluate message per site per round and
polls every 3 s (15-19 s per round measured, see FLOWER.md). fedmed's loop sends one ``train``
message per site; the reply carries the trained arrays and the site's validation metrics; it
polls ``pull_messages`` every ``poll-interval`` (0.1 s).

Each round:

1. wait until ``min-sites`` sites are connected and in the roster (at most ``join-timeout`` s,
   and one more ask of the nodes still unnamed then, then FederationError); new nodes are
   asked who they are (:mod:`.roster`: the name comes from the key a site authenticated
   with); with ``sites-per-round`` pick that many of them (:mod:`.sampling`);
2. send every picked site the global arrays (without the sites' normalization statistics
   under FedBN; with SCAFFOLD's control variate) packed into one Flower object
   (:mod:`fedmed.wire`), the round's :class:`~fedmed.roundconfig.TrainConfig` and the run's
   identity;
3. collect replies until all answered or ``round-timeout``; check each one on its own
   (:mod:`.attempt`, :mod:`.validation`), dropping bad ones with a logged reason;
4. with fewer than ``min-sites`` valid replies the attempt is logged as failed and the round
   retried (``retry-failed-rounds`` times, then FederationError; steps 1-4 are
   :mod:`.rounds`); otherwise aggregate
   (:mod:`.aggregate`), evaluate on the held-out folder (reported, never used to choose a
   model), checkpoint, log, redraw the report.

Model selection uses validation data only: every site evaluates the global model it receives
on its validation split before it trains (federated evaluation); those scores, arriving with
round r + 1, choose whether checkpoint r is the best (:mod:`.selection`). The final model is
scored by the end-of-run evaluation (:mod:`.evaluation`), which also writes the cross-site
table.

With ``secure-aggregation`` steps 2-3 are SecAgg+'s four stages (:mod:`.secagg`): the only
"reply" is the sites' weighted mean update, and the sites that sent masked updates count as the
valid replies. A site that failed or timed out is simply asked again next round. A restarted
server resumes after the last complete checkpoint with the same global weights and
server-side state (optimizer, SCAFFOLD control variate).

Example:
    >>> result = Federation(grid, RunSettings(num_rounds=2, min_sites=2)).run()
    >>> result.rounds_completed
    2
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedmed.errors import ConfigError, FederationError
from fedmed.globalmodel import build_network, local_norm_keys, model_arrays
from fedmed.roundconfig import TrainConfig
from fedmed.runsettings import RunSettings
from fedmed.scoring import evaluate_folder
from fedmed.security.accountant import PrivacyBudgetExhausted
from fedmed.security.guard import ServerGuard

from .aggregate import Aggregator, SiteUpdate
from .checkpoint import CheckpointStore
from .evaluation import run_final_evaluation
from .polling import exchange
from .report import MetricsLog, completed_records, write_report
from .roster import Roster, SiteInfo, registered_names
from .rounds import run_attempt, run_attempts
from .secagg import SecureRound
from .selection import record_selection

__all__ = ["Federation", "FederationResult", "SiteInfo", "train_config"]

logger = logging.getLogger(__name__)

HoldoutFn = Callable[[Mapping[str, np.ndarray], TrainConfig], dict[str, Any] | None]


def train_config(settings: RunSettings, server_round: int, *, run_id: str = "") -> TrainConfig:
    """The round instructions the sites receive (the preprocessing from ``settings.plan``;
    the round's learning rate under ``lr-schedule``, which the centralized baseline
    follows per round-equivalent too)."""
    pipeline = settings.plan.pipeline_settings()
    return TrainConfig(
        model=settings.model,
        model_features=settings.features,
        in_channels=settings.in_channels,
        out_channels=settings.out_channels,
        patch_size=settings.patch_shape,
        local_epochs=settings.local_epochs,
        local_steps=settings.local_steps,
        lr=settings.round_lr(server_round),
        batch_size=settings.batch_size,
        proximal_mu=settings.effective_proximal_mu,
        fedbn=settings.fedbn,
        val_fraction=settings.val_fraction,
        seed=settings.seed,
        server_round=server_round,
        run_id=run_id,
        aggregation_weight=settings.aggregation_weight,
        nsd_tolerance_mm=settings.nsd_tolerance_mm,
        ditto_lambda=settings.ditto_lambda,
        scaffold=settings.strategy == "scaffold",
        model_norm=settings.model_norm,
        loss=settings.loss,
        nr_gamma=settings.nr_gamma,
        nr_denominator=settings.nr_denominator,
        self_ensembling=settings.self_ensembling,
        ema_decay=settings.ema_decay,
        lamp_skips=settings.lamp_skips,
        target_spacing=pipeline.pixdim,
        intensity=pipeline.intensity,
        hu_window=pipeline.hu_window,
    )


@dataclass
class FederationResult:
    """What a finished run leaves: the final global arrays and the rounds it completed."""

    weights: dict[str, np.ndarray]
    rounds_completed: int
    failed_attempts: int
    sites: dict[int, SiteInfo] = field(default_factory=dict)
    stopped: str = ""  # why the run ended before num-rounds ("" when it did not)


class Federation:
    """Runs the configured rounds on ``grid``; ``holdout_fn`` overrides held-out evaluation.

    Example:
        >>> Federation(grid, RunSettings()).run().rounds_completed
        3
    """

    def __init__(
        self, grid: Grid, settings: RunSettings, *, holdout_fn: HoldoutFn | None = None
    ) -> None:
        self.grid = grid
        self.settings = settings
        self.roster = Roster(max_site_cases=settings.max_site_cases)
        self.store = CheckpointStore(settings.out_path)
        self.log = MetricsLog(settings.out_path)
        self.guard = ServerGuard(settings, config_hash=settings.identity_hash())
        self.secure = SecureRound(grid, settings) if settings.secure_aggregation else None
        self._holdout_fn = holdout_fn or self._evaluate_holdout
        model = build_network(train_config(settings, 0), seed=settings.seed)
        self.local_keys = local_norm_keys(model) if settings.fedbn else frozenset()
        self.initial_weights = model_arrays(model)
        # every checkpoint records how the sites preprocess, so `fedmed infer` does the same
        self.plan = train_config(settings, 0).plan.to_metadata()["plan"]
        self.param_keys = frozenset(n for n, p in model.named_parameters() if p.requires_grad)
        controls = None
        if settings.strategy == "scaffold":
            controls = {
                n: np.zeros(tuple(p.shape), np.float32)
                for n, p in model.named_parameters()
                if p.requires_grad
            }
        self.aggregator = Aggregator(settings, controls=controls)
        self.run_id = ""  # sha256 of round 0's checkpoint, set by _start
        self.exhausted: set[str] = set()  # sites that refused to exceed a privacy budget

    @property
    def sites(self) -> dict[int, SiteInfo]:
        """The roster: node id -> site."""
        return self.roster.sites

    def config(self, server_round: int) -> TrainConfig:
        """The round's :class:`TrainConfig`, with this run's identity."""
        return train_config(self.settings, server_round, run_id=self.run_id)

    # -- held-out evaluation -------------------------------------------------------------
    def _evaluate_holdout(
        self, weights: Mapping[str, np.ndarray], cfg: TrainConfig
    ) -> dict[str, Any] | None:
        if not self.settings.data_dir:
            return None
        # FedBN (SiloBN): the global model's affine weights are the sites'; its batch-norm
        # statistics are estimated on the held-out images (AdaBN), never on their labels
        result = evaluate_folder(weights, self.settings.data_dir, cfg, adapt_norm=cfg.fedbn)
        if cfg.fedbn:
            result["norm-statistics"] = "held-out images (AdaBN)"
        return result

    # -- sites ---------------------------------------------------------------------------
    @property
    def _sampling(self) -> bool:
        """With ``sites-per-round`` only the sampled nodes are asked who they are (start-up
        stays flat in the number of sites); otherwise every node joins the roster first."""
        return self.settings.sites_per_round > 0

    def wait_for_sites(self) -> list[int]:
        """Node ids of the connected sites that may train, once at least ``min-sites`` are:
        sites in the roster, or (sampling) every connected node not out of budget."""
        deadline = time.monotonic() + self.settings.join_timeout
        logged, last_ask = -1, False
        while True:
            connected = sorted(self.grid.get_node_ids())
            self._update_roster(connected, ask=[] if self._sampling else None, now=last_ask)
            known = connected if self._sampling else [n for n in connected if n in self.sites]
            able = [n for n in known if self.roster.name_of(n) not in self.exhausted]
            if len(able) >= self.settings.min_sites:
                return able
            if self.exhausted and len(known) >= self.settings.min_sites:
                raise PrivacyBudgetExhausted(
                    f"privacy budget exhausted: only {len(able)} of min-sites "
                    f"{self.settings.min_sites} sites may still train ("
                    f"{', '.join(sorted(self.exhausted))} refused: their epsilon would exceed "
                    "their own max-epsilon or the run's dp-max-epsilon); the last checkpoint "
                    "holds the final model"
                )
            if len(known) != logged:
                logger.info(
                    "%d of min-sites %d sites connected; waiting",
                    len(known),
                    self.settings.min_sites,
                )
                logged = len(known)
            unnamed = len(connected) - len(known)
            if time.monotonic() >= deadline and unnamed and not last_ask:
                # a node whose app started after the first ask timed out answers a new one
                logger.warning("join-timeout reached: asking %d unnamed nodes once more", unnamed)
                last_ask = True
                continue
            if time.monotonic() >= deadline:
                raise FederationError(
                    f"only {len(known)} of min-sites {self.settings.min_sites} sites connected "
                    f"after join-timeout {self.settings.join_timeout:g} s"
                    + (f" ({unnamed} more did not say which site they are)" if unnamed else "")
                    + ": start the missing sites (fedmed-client --site NAME), check their "
                    "logs, or lower min-sites"
                )
            time.sleep(min(1.0, self.settings.poll_interval * 10))

    def _update_roster(
        self, connected: list[int], *, ask: list[int] | None = None, now: bool = False
    ) -> None:
        """Name the new nodes of ``ask`` (default: every connected node); ``now`` asks even
        those still pausing after a failed answer."""
        asked = connected if ask is None else ask
        pruned = all(n in set(connected) for n in self.sites)
        if pruned and all(n in self.sites for n in asked):
            return
        try:
            registered = registered_names(self.grid.get_nodes())
        except Exception as err:  # a grid without node details: names are self-declared
            logger.warning("cannot read node registrations (%s): names are self-declared", err)
            registered = {}
        self.roster.update(
            connected,
            registered,
            lambda messages: self._exchange(messages, min(self.settings.round_timeout, 120.0)),
            config=self.config(0).to_config(),
            ttl=self.settings.round_timeout,
            ask=ask,
            now=now,
        )

    def _names(self) -> dict[int, str]:
        """Node id -> site name for sampling: the roster's, and (sampling) the names the
        SuperLink registered with the sites' keys, so a restart samples the same sites."""
        names = dict(self.roster.names())
        if self._sampling:  # a grid without node details: the roster's names only
            with contextlib.suppress(Exception):
                names = {**registered_names(self.grid.get_nodes()), **names}
        return names

    # -- messaging -----------------------------------------------------------------------
    def _exchange(self, messages: list[Message], timeout: float) -> dict[int, Message]:
        """Push ``messages`` and pull replies until all arrived or ``timeout``; by node id."""
        answered = exchange(
            self.grid, messages, timeout=timeout, interval=self.settings.poll_interval
        )
        return {sent.metadata.dst_node_id: reply for sent, reply in answered}

    # -- one round -----------------------------------------------------------------------
    def shared_weights(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The part of ``weights`` the sites receive: all but the keys FedBN keeps at the sites
        (:attr:`local_keys`; none without FedBN)."""
        return {k: v for k, v in weights.items() if k not in self.local_keys}

    def run_round(
        self, server_round: int, attempt: int, nodes: list[int], weights: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, Any], list[SiteUpdate]]:
        """One attempt: send, collect, validate (:func:`.rounds.run_attempt`). Returns the log
        record and the valid updates."""
        return run_attempt(self, server_round, attempt, nodes, weights)

    # -- the run -------------------------------------------------------------------------
    def _start(self) -> tuple[dict[str, np.ndarray], int]:
        if self.settings.data_dir and not Path(self.settings.data_dir).is_dir():
            raise ConfigError(
                f"run config key 'data-dir' is {self.settings.data_dir!r}, which is not a folder: "
                "give the server's held-out folder, or '' for none"
            )
        ident = self.settings.identity_hash()
        latest = self.store.load_latest(signed_by=self.guard.signer)  # verifies when signing
        if latest is None:
            cfg = self.config(0)
            holdout = self._holdout_fn(self.initial_weights, cfg)
            record = {"round": 0, "status": "initial", "sites": {}, "holdout": holdout}
            ckpt = self.store.save(
                0, self.initial_weights, metrics=record, config_hash=ident, plan=self.plan
            )
            self.run_id = ckpt.hash
            self.guard.start(first_round=1, num_rounds=self.settings.num_rounds)
            self.guard.after_attempt(record, [], ckpt)
            self.log.truncate_after(-1)
            self.log.append(record)
            return dict(self.initial_weights), 1
        if latest.meta.get("config_hash") != ident:
            raise ConfigError(
                f"out-dir {self.settings.out_dir} holds a run with other settings (config hash "
                f"{str(latest.meta.get('config_hash'))[:12]} vs {ident[:12]}): use a new out-dir "
                "or the original settings to resume"
            )
        if set(latest.weights) != set(self.initial_weights):
            raise ConfigError(
                f"checkpoint {latest.path} does not fit model {self.settings.model!r}: use a new "
                "out-dir"
            )
        self.run_id = latest.hash if latest.round == 0 else self._round_zero_hash()
        self.aggregator.load_state_arrays(latest.server_state)
        self.log.truncate_after(latest.round)
        if not any(r["round"] == latest.round for r in completed_records(self.log.read())):
            self.log.append(latest.meta["metrics"])
        logger.info("resuming after round %d from %s", latest.round, latest.path)
        self.guard.start(first_round=latest.round + 1, num_rounds=self.settings.num_rounds)
        return dict(latest.weights), latest.round + 1

    def _round_zero_hash(self) -> str:
        meta = json.loads((self.store.round_dir(0) / "meta.json").read_text())
        return str(meta["weights_sha256"])

    def run(self) -> FederationResult:
        """Run (or resume) every round; FederationError when a round cannot be completed."""
        weights, first = self._start()
        failed, last, stopped = 0, first - 1, ""
        for server_round in range(first, self.settings.num_rounds + 1):
            try:
                record, updates, retries = run_attempts(self, server_round, weights)
            except PrivacyBudgetExhausted as err:  # an ending, not a failure: the model stands
                stopped = str(err)
                logger.warning("run stops before round %d: %s", server_round, stopped)
                self.log.append({"round": server_round, "status": "stopped", "reason": stopped})
                break
            failed += retries
            try:
                shared = self.aggregator.aggregate(self.shared_weights(weights), updates)
            except ValueError as err:  # e.g. weights that do not sum to a finite number
                raise FederationError(
                    f"round {server_round}: the valid replies cannot be aggregated ({err})"
                ) from err
            self.aggregator.update_control(updates, num_sites=max(1, len(self.sites)))
            weights = {**weights, **shared}
            record["status"] = "ok"
            record_selection(self.store, record, server_round - 1, audit=self.guard)
            record["holdout"] = self._holdout_fn(weights, self.config(server_round))
            record["dp"] = self.guard.privacy_spent()
            ckpt = self.store.save(
                server_round,
                weights,
                metrics=record,
                config_hash=self.settings.identity_hash(),
                server_state=self.aggregator.state_arrays(),
                plan=self.plan,
            )
            self.log.append(record)
            self.guard.after_attempt(record, updates, ckpt)
            self._report()
            logger.info("round %d done: %s", server_round, _summary_line(record))
            last = server_round
        self.evaluate_final(weights, last_round=last)
        self._report()
        return FederationResult(weights, last, failed, dict(self.sites), stopped=stopped)

    def evaluate_final(
        self, weights: Mapping[str, np.ndarray], *, last_round: int | None = None
    ) -> None:
        """The end-of-run evaluation (:mod:`.evaluation`): scores the final round, writes the
        cross-site table."""
        run_final_evaluation(self, weights, last_round=last_round)

    def _report(self) -> None:
        write_report(
            self.settings.out_path, self.log.read(), settings=self.settings.to_run_config()
        )


def _summary_line(record: Mapping[str, Any]) -> str:
    holdout = record.get("holdout") or {}
    sites = ", ".join(
        f"{s} {m.get('val-dice', float('nan')):.3f}" for s, m in sorted(record["sites"].items())
    )
    return f"held-out Dice {holdout.get('dice', float('nan'))}; site val Dice: {sites}"
