"""The server's round loop on Flower's Grid: one train message per site per round.

Flower's stock ``strategy.start`` sends a train and an evaluate message per site per round and
polls every 3 s (15-19 s per round measured, see FLOWER.md). fedmed's loop sends one ``train``
message per site; the reply carries the trained arrays and the site's validation metrics; it
polls ``pull_messages`` every ``poll-interval`` (0.1 s).

Each round:

1. wait until ``min-sites`` sites are connected (at most ``join-timeout`` s, then
   FederationError); ask new sites their name with a ``query`` message (the site roster);
   with ``sites-per-round`` pick that many of them (:mod:`.sampling`);
2. send every picked site the global arrays (without normalization layers under FedBN;
   packed into one Flower object, :mod:`fedmed.wire`) and the round's
   :class:`~fedmed.task.TrainConfig`;
3. collect replies until all answered or ``round-timeout``; check each one
   (:mod:`.validation`), dropping bad ones with a logged reason;
4. with fewer than ``min-sites`` valid replies the attempt is logged as failed and the round
   retried (``retry-failed-rounds`` times, then FederationError); otherwise aggregate
   (:mod:`.aggregate`), evaluate on the held-out folder, checkpoint, log, redraw the report.

With ``secure-aggregation`` steps 2-3 are SecAgg+'s four stages (:mod:`.secagg`): the only
"reply" is the sites' weighted mean update, and the sites that sent masked updates count as the
valid replies. A site that failed or timed out is simply asked again next round. A restarted
server resumes after the last complete checkpoint with the same global weights and
server-optimizer state.

Example:
    >>> result = Federation(grid, RunSettings(num_rounds=2, min_sites=2)).run()
    >>> result.rounds_completed
    2
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmed import wire
from fedmed.errors import ConfigError, FederationError
from fedmed.security.guard import ServerGuard
from fedmed.task import TrainConfig, build_network, evaluate_folder, model_arrays, norm_layer_keys

from .aggregate import Aggregator, SiteUpdate
from .checkpoint import CheckpointStore
from .polling import exchange
from .report import MetricsLog, attempt_record, completed_records, write_report
from .sampling import sample_sites
from .secagg import SecureRound
from .settings import RunSettings
from .validation import InvalidReply, check_reply

__all__ = ["Federation", "FederationResult", "SiteInfo", "train_config"]

logger = logging.getLogger(__name__)

_REPLY_RECORDS = {wire.ARRAYS, wire.INDEX, "metrics"}
HoldoutFn = Callable[[Mapping[str, np.ndarray], TrainConfig], dict[str, Any] | None]


def train_config(settings: RunSettings, server_round: int) -> TrainConfig:
    """The round instructions the sites receive."""
    return TrainConfig(
        model=settings.model,
        model_features=settings.features,
        in_channels=settings.in_channels,
        out_channels=settings.out_channels,
        patch_size=settings.patch_shape,
        local_epochs=settings.local_epochs,
        local_steps=settings.local_steps,
        lr=settings.lr,
        batch_size=settings.batch_size,
        proximal_mu=settings.proximal_mu,
        fedbn=settings.fedbn,
        val_fraction=settings.val_fraction,
        seed=settings.seed,
        server_round=server_round,
    )


@dataclass(frozen=True)
class SiteInfo:
    """A connected site as its query reply described it (name and case counts only)."""

    node_id: int
    name: str
    num_train_cases: int = 0
    num_val_cases: int = 0


@dataclass
class FederationResult:
    """What a finished run leaves: the final global arrays and the rounds it completed."""

    weights: dict[str, np.ndarray]
    rounds_completed: int
    failed_attempts: int
    sites: dict[int, SiteInfo] = field(default_factory=dict)


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
        self.sites: dict[int, SiteInfo] = {}
        self.store = CheckpointStore(settings.out_path)
        self.log = MetricsLog(settings.out_path)
        self.aggregator = Aggregator(settings)
        self.guard = ServerGuard(settings, config_hash=settings.identity_hash())
        self.secure = SecureRound(grid, settings) if settings.secure_aggregation else None
        self._holdout_fn = holdout_fn or self._evaluate_holdout
        model = build_network(train_config(settings, 0), seed=settings.seed)
        self.norm_keys = norm_layer_keys(model) if settings.fedbn else frozenset()
        self.initial_weights = model_arrays(model)

    # -- held-out evaluation -------------------------------------------------------------
    def _evaluate_holdout(
        self, weights: Mapping[str, np.ndarray], cfg: TrainConfig
    ) -> dict[str, Any] | None:
        if not self.settings.data_dir:
            return None
        # FedBN: the global model has no shared norm statistics; estimate them on the
        # held-out images (AdaBN) so its Dice means something
        return evaluate_folder(weights, self.settings.data_dir, cfg, adapt_norm=cfg.fedbn)

    # -- sites ---------------------------------------------------------------------------
    def wait_for_sites(self) -> list[int]:
        """Node ids of connected sites once at least ``min-sites`` are there."""
        deadline = time.monotonic() + self.settings.join_timeout
        logged = -1
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.settings.min_sites:
                self._query_new(nodes)
                return nodes
            if len(nodes) != logged:
                logger.info(
                    "%d of min-sites %d sites connected; waiting",
                    len(nodes),
                    self.settings.min_sites,
                )
                logged = len(nodes)
            if time.monotonic() >= deadline:
                raise FederationError(
                    f"only {len(nodes)} of min-sites {self.settings.min_sites} sites connected "
                    f"after join-timeout {self.settings.join_timeout:g} s: start the missing "
                    "sites (fedmed-client --site NAME) or lower min-sites"
                )
            time.sleep(min(1.0, self.settings.poll_interval * 10))

    def _query_new(self, nodes: list[int]) -> None:
        new = [n for n in nodes if n not in self.sites]
        if not new:
            return
        content = RecordDict({"config": ConfigRecord(train_config(self.settings, 0).to_config())})
        messages = [
            Message(
                content, node, MessageType.QUERY, group_id="roster", ttl=self.settings.round_timeout
            )
            for node in new
        ]
        replies = self._exchange(messages, timeout=min(self.settings.round_timeout, 120.0))
        taken = {s.name for s in self.sites.values()}
        for node in new:
            reply = replies.get(node)
            if reply is None or reply.has_error() or "site" not in reply.content:
                # not in the roster: the site is asked again before the next round
                why = reply.error.reason if reply is not None and reply.has_error() else "no reply"
                logger.warning("node %d did not say which site it is (%s)", node, why)
                continue
            info = reply.content["site"]
            name = str(info.get("name", "")) or f"node-{node}"
            if name in taken:  # two nodes claiming one name: keep both apart
                name = f"{name}#{node}"
            taken.add(name)
            site = SiteInfo(
                node,
                name,
                int(info.get("num-train-cases", 0)),
                int(info.get("num-val-cases", 0)),
            )
            self.sites[node] = site
            logger.info(
                "site %s joined (node %d, %d train / %d val cases)",
                name,
                node,
                site.num_train_cases,
                site.num_val_cases,
            )

    # -- messaging -----------------------------------------------------------------------
    def _exchange(self, messages: list[Message], *, timeout: float) -> dict[int, Message]:
        """Push ``messages`` and pull replies until all arrived or ``timeout``; by node id."""
        answered = exchange(
            self.grid, messages, timeout=timeout, interval=self.settings.poll_interval
        )
        return {sent.metadata.dst_node_id: reply for sent, reply in answered}

    def _site_name(self, node: int) -> str:
        """The site's name from the roster, ``node-<id>`` for a node that did not say it."""
        return self.sites[node].name if node in self.sites else f"node-{node}"

    # -- one round -----------------------------------------------------------------------
    def _shared(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in weights.items() if k not in self.norm_keys}

    def run_round(
        self, server_round: int, attempt: int, nodes: list[int], weights: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, Any], list[SiteUpdate]]:
        """One attempt: send, collect, validate. Returns the log record and valid updates."""
        started = time.monotonic()
        sent = self._shared(weights)
        cfg = train_config(self.settings, server_round)
        names = {n: self._site_name(n) for n in nodes}
        extras = self.guard.train_records(
            sent,
            cfg.to_config(),
            server_round=server_round,
            attempt=attempt,
            sites=list(names.values()),
        )
        if self.secure is not None:  # SecAgg+: the server only ever sees the weighted mean
            record, updates = self.secure.attempt(
                server_round, attempt, names, sent, cfg.to_config(), extras
            )
        else:
            record, updates = self._plain_attempt(server_round, attempt, names, sent, cfg, extras)
        record["duration-s"] = round(time.monotonic() - started, 3)
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return record, updates

    def _plain_attempt(
        self,
        server_round: int,
        attempt: int,
        names: Mapping[int, str],
        sent: Mapping[str, np.ndarray],
        cfg: TrainConfig,
        extras: Mapping[str, Mapping[str, Any]],
    ) -> tuple[dict[str, Any], list[SiteUpdate]]:
        """A train message to each site in ``names``; every reply checked on its own."""
        content = RecordDict(
            {
                **wire.pack(sent),  # all arrays in one Flower object: see fedmed.wire
                "config": ConfigRecord(cfg.to_config()),
                **{name: ConfigRecord(values) for name, values in extras.items()},
            }
        )
        group = f"round-{server_round}.{attempt}"
        messages = [
            Message(
                content, node, MessageType.TRAIN, group_id=group, ttl=self.settings.round_timeout
            )
            for node in names
        ]
        replies = self._exchange(messages, timeout=self.settings.round_timeout)
        record = attempt_record(server_round, attempt)
        updates: list[SiteUpdate] = []
        for node, name in names.items():
            reply = replies.get(node)
            if reply is None:
                record["missing"].append(name)
                logger.warning("round %d: site %s did not reply in time", server_round, name)
                continue
            try:
                update = self._parse(reply, name, sent)
            except InvalidReply as err:
                record["rejected"][name] = str(err)
                logger.warning("round %d: reply of site %s dropped: %s", server_round, name, err)
                continue
            updates.append(update)
            record["sites"][name] = dict(update.metrics)
        return record, updates

    def _parse(self, reply: Message, name: str, sent: Mapping[str, np.ndarray]) -> SiteUpdate:
        if reply.has_error():
            raise InvalidReply(f"site error {reply.error.code}: {reply.error.reason}")
        content = reply.content
        if set(content) != _REPLY_RECORDS or "metrics" not in content.metric_records:
            raise InvalidReply(
                f"reply must hold exactly ArrayRecord {wire.ARRAYS!r}, ConfigRecord "
                f"{wire.INDEX!r} and MetricRecord 'metrics', got {sorted(content)}"
            )
        try:
            arrays = wire.unpack_content(content)
        except wire.WireError as err:
            raise InvalidReply(f"packed arrays: {err}") from err
        metrics = dict(content.metric_records["metrics"])
        n = check_reply(arrays, metrics, sent, max_update_norm=self.settings.max_update_norm)
        scalars = {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
        return SiteUpdate(name, arrays, n, scalars)

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
            cfg = train_config(self.settings, 0)
            holdout = self._holdout_fn(self.initial_weights, cfg)
            record = {"round": 0, "status": "initial", "sites": {}, "holdout": holdout}
            ckpt = self.store.save(
                0, self.initial_weights, metrics=record, config_hash=ident, score=_score(record)
            )
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
        self.aggregator.load_state_arrays(latest.server_state)
        self.log.truncate_after(latest.round)
        if not any(r["round"] == latest.round for r in completed_records(self.log.read())):
            self.log.append(latest.meta["metrics"])
        logger.info("resuming after round %d from %s", latest.round, latest.path)
        self.guard.start(first_round=latest.round + 1, num_rounds=self.settings.num_rounds)
        return dict(latest.weights), latest.round + 1

    def run(self) -> FederationResult:
        """Run (or resume) every round; FederationError when a round cannot be completed."""
        weights, first = self._start()
        ident = self.settings.identity_hash()
        failed = 0
        for server_round in range(first, self.settings.num_rounds + 1):
            avoid: set[int] = set()  # sites that failed this round: asked last on a retry
            for attempt in range(1, self.settings.retry_failed_rounds + 2):
                connected = self.wait_for_sites()
                names = {node: site.name for node, site in self.sites.items()}
                nodes = sample_sites(
                    connected, self.settings, server_round, names=names, avoid=avoid
                )
                record, updates = self.run_round(server_round, attempt, nodes, weights)
                if record.get("contributors", len(updates)) >= self.settings.min_sites:
                    break
                failed += 1
                bad = {*record["missing"], *record["rejected"]}
                avoid |= {n for n in nodes if self._site_name(n) in bad}
                record["status"] = "failed"
                logger.warning(
                    "round %d attempt %d failed: %d valid replies, min-sites is %d",
                    server_round,
                    attempt,
                    record.get("contributors", len(updates)),
                    self.settings.min_sites,
                )
                record["dp"] = self.guard.privacy_spent()
                self.log.append(record)
                self.guard.after_attempt(record, updates)
                self._report()
            else:
                raise FederationError(
                    f"round {server_round} had fewer than min-sites {self.settings.min_sites} "
                    f"valid replies in {self.settings.retry_failed_rounds + 1} attempts (see "
                    f"{self.log.path}): check the sites' logs, raise round-timeout or lower "
                    "min-sites"
                )
            shared = self.aggregator.aggregate(self._shared(weights), updates)
            weights = {**weights, **shared}
            record["status"] = "ok"
            record["holdout"] = self._holdout_fn(weights, train_config(self.settings, server_round))
            record["dp"] = self.guard.privacy_spent()
            ckpt = self.store.save(
                server_round,
                weights,
                metrics=record,
                config_hash=ident,
                server_state=self.aggregator.state_arrays(),
                score=_score(record),
            )
            self.log.append(record)
            self.guard.after_attempt(record, updates, ckpt)
            self._report()
            logger.info("round %d done: %s", server_round, _summary_line(record))
        return FederationResult(weights, self.settings.num_rounds, failed, dict(self.sites))

    def _report(self) -> None:
        write_report(
            self.settings.out_path, self.log.read(), settings=self.settings.to_run_config()
        )


def _score(record: Mapping[str, Any]) -> float | None:
    """Held-out Dice, else the sites' validation Dice weighted by samples, else None."""
    holdout = record.get("holdout")
    if holdout and holdout.get("dice") is not None and np.isfinite(holdout["dice"]):
        return float(holdout["dice"])
    sites = [m for m in (record.get("sites") or {}).values() if "val-dice" in m]
    if not sites:
        return None
    weights = [m.get("num-examples", 1.0) for m in sites]
    return float(np.average([m["val-dice"] for m in sites], weights=weights))


def _summary_line(record: Mapping[str, Any]) -> str:
    holdout = record.get("holdout") or {}
    sites = ", ".join(
        f"{s} {m.get('val-dice', float('nan')):.3f}" for s, m in sorted(record["sites"].items())
    )
    return f"held-out Dice {holdout.get('dice', float('nan'))}; site val Dice: {sites}"
