"""The fedmed ClientApp: a site's ``train`` and ``query`` handlers over :class:`SiteTask`.

Flower loads it as ``fedmed.client.app:app``. The site is described by the SuperNode's
``--node-config`` (:mod:`.runtime`: data, cache, policy and hardware keys).

The train/validation split is seeded by the run's ``seed`` (sent in each round's config), so
every site splits the same way for a given run.

Messages (the privacy contract: nothing else leaves the site):

- ``query`` -> ConfigRecord ``site``: ``name``, ``num-train-cases``, ``num-val-cases``.
  The server asks each new node once and maps node ids to site names with it.
- ``train`` (the global arrays packed as ArrayRecord ``arrays`` + ConfigRecord
  ``arrays-index``, see :mod:`fedmed.wire`, and ConfigRecord ``config``) -> exactly the model
  arrays (the same keys, shapes and dtypes as received), packed the same way (ArrayRecord
  ``arrays`` holding one ``packed`` array, ConfigRecord ``arrays-index`` with their keys,
  dtypes, shapes and offsets), and MetricRecord ``metrics`` (``num-examples`` = training
  samples, ``num-steps``, ``train-loss``, ``val-dice``, ``val-hd95``, ``train-seconds``).
  The message may also carry ConfigRecords ``signature`` (the site refuses a model whose
  signature fails; node config ``server-ca``) and ``privacy`` (DP: the reply is the clipped,
  noised update added to the global model): see :mod:`fedmed.security.guard`.
- ``evaluate`` (end of run) -> the site's cross-site evaluation summaries: see
  :mod:`.evaluate`.
- On any failure the reply is an error naming only the exception type and the site; the
  traceback (which may hold file paths) stays in the site's log.

Each train message is one round at the site (:func:`fedmed.siteround.run_site_round`): the
received global model is evaluated on the validation split first (``global-val-*``, what the
server selects its best model by), then trained. What the site keeps between rounds of a run
(SiloBN statistics under ``fedbn``, SCAFFOLD's control variate, Ditto's personal model) is a
:class:`~fedmed.siteround.SiteState` stored under the run's ``run-id``
(:mod:`.local_state`), never reused by another run.

Example:
    >>> client_app = make_client_app(resolve_site=lambda ctx: SiteRuntime("A", "demo/site-A"))
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedmed import wire
from fedmed.errors import ConfigError
from fedmed.flower.codes import ErrorCode
from fedmed.globalmodel import build_network, model_arrays
from fedmed.io.msd import split_cases
from fedmed.pipeline import PipelineSettings, load_cases
from fedmed.roundconfig import TrainConfig
from fedmed.scaffold import join_controls, split_controls
from fedmed.security.accountant import PrivacyBudgetExhausted
from fedmed.security.dp import DpParams, reduce_metrics
from fedmed.security.guard import SiteGuard
from fedmed.security.secagg import is_secure_message, secure_train
from fedmed.siteround import dp_sgd_config, num_patients, run_site_round
from fedmed.task import SiteTask, ensure_app_logging, site_volume_mm3

from .evaluate import evaluate_message
from .local_state import StateStore
from .privacy import SiteBudget
from .runtime import SiteResolver, SiteRuntime, site_from_node_config

__all__ = ["app", "make_client_app"]

logger = logging.getLogger(__name__)

_TASKS: dict[tuple[Any, ...], SiteTask] = {}


def _pipeline(site: SiteRuntime, cfg: TrainConfig) -> PipelineSettings:
    """The site's pipeline: the run's preprocessing plan (spacing, intensity), the site's
    cache (on disk sealed, unless the site accepts plaintext), and the case guard with the
    model's classes."""
    sealed = site.cache_mode == "disk" and not site.plaintext_cache
    return cfg.plan.pipeline_settings(
        cache_mode="disk-encrypted" if sealed else site.cache_mode,
        cache_dir=Path(site.cache_dir) if site.cache_dir else None,
        guard=dataclasses.replace(site.guard, num_classes=cfg.out_channels),
    )


def _task(site: SiteRuntime, cfg: TrainConfig) -> SiteTask:
    """One SiteTask per site, split and pipeline, reused while the process lives (simulation
    actors)."""
    settings = _pipeline(site, cfg)
    key = (site, cfg.val_fraction, cfg.seed, settings)
    if key not in _TASKS:
        _TASKS[key] = SiteTask(
            site.data_dir,
            hardware=site.hardware,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            settings=settings,
        )
    return _TASKS[key]


def _check_record_dp(site: SiteRuntime, cfg: TrainConfig) -> None:
    """DP-SGD takes per-patient gradients of the whole model on one device."""
    assert site.hardware is not None
    if cfg.model == "lamp_unet" and len(site.hardware.devices) > 1:
        raise ConfigError(
            f"site {site.name}: device = {site.device!r} splits the LAMP model over "
            f"{len(site.hardware.devices)} devices, but the run uses record-level DP (dp-mode "
            "= 'record'), whose per-patient gradients need the whole model on one device: "
            "name one device in the site config, or ask for dp-mode 'site'"
        )


def _error_reply(msg: Message, site: str, err: Exception) -> Message:
    if isinstance(err, PrivacyBudgetExhausted):  # a refusal, not a failure: say why
        logger.warning("site %s: %s", site, err)
        reason = f"PrivacyBudgetExhausted at site {site}: {err}"
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
        )
    logger.exception("site %s: %s message failed", site, msg.metadata.message_type)
    reason = f"{type(err).__name__} at site {site}; details are in the site's log"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _train_site(
    site: SiteRuntime,
    context: Context,
    received: dict[str, np.ndarray],
    config: dict[str, Any],
    records: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One local round: check the global model, train, protect. ``(arrays to send, metrics)``;
    the arrays hold the model's keys and, under SCAFFOLD, the site's control-variate change
    (:mod:`fedmed.scaffold`).

    ``records`` holds the round's extra ConfigRecords by name (``signature``, ``privacy``).
    """
    cfg = TrainConfig.from_config(config)
    logger.info("site %s round %d: training", site.name, cfg.server_round)
    guard = SiteGuard.for_node(context.node_config, site=site.name, cache_dir=site.cache_dir)
    signed = guard.check_global(
        received, config, records.get("signature"), server_round=cfg.server_round
    )
    task = _task(site, cfg)
    received, server_control = split_controls(received)
    dp = DpParams.from_record(records.get("privacy"))
    if dp.mode == "record":
        _check_record_dp(site, cfg)
    budget = entry = dp_sgd = None
    if dp.enabled:  # the site's own budget is checked before anything is trained
        budget = SiteBudget(context, cache_dir=site.cache_dir, max_epsilon=site.max_epsilon)
        if dp.mode == "record":
            dp_sgd = dp_sgd_config(task, cfg, dp)
            entry = dp_sgd.ledger_entry(
                num_patients=num_patients(task), run=cfg.run_id, server_round=cfg.server_round
            )
        else:
            entry = dp.ledger_entry(run=cfg.run_id, server_round=cfg.server_round)
        budget.check(dp, entry, run=cfg.run_id)
    store = StateStore(context, cache_dir=site.cache_dir)
    state = store.load(cfg.run_id, reference=model_arrays(build_network(cfg)))
    result = run_site_round(
        task, received, cfg, state, server_control=server_control or None, dp_sgd=dp_sgd
    )
    store.save(result.state)
    sent = guard.protect(
        result.arrays,
        received,
        records.get("privacy"),
        server_round=cfg.server_round,
        signature_status=signed,
        num_examples=float(result.metrics.get("num-examples", 0)),
    )
    logger.info("site %s round %d: %s", site.name, cfg.server_round, result.metrics)
    metrics = result.metrics
    if budget is not None and entry is not None:
        metrics = {**metrics, **budget.spend(entry, dp, run=cfg.run_id)}
        metrics = reduce_metrics(metrics, dp, num_train_cases=task.num_train_cases)
    return join_controls(sent, result.control_delta), metrics


def make_client_app(*, resolve_site: SiteResolver = site_from_node_config) -> ClientApp:
    """A ClientApp whose sites come from ``resolve_site`` (default: the node config)."""
    client_app = ClientApp()

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        ensure_app_logging()
        name = f"node-{context.node_id}"
        try:
            site = resolve_site(context)
            name = site.name
            cfg = TrainConfig.from_config(msg.content["config"])
            cases = load_cases([site.data_dir], _pipeline(site, cfg))
            train, val = split_cases(cases, val_fraction=cfg.val_fraction, seed=cfg.seed)
        except Exception as err:  # the reply must not carry paths: see _error_reply
            return _error_reply(msg, name, err)
        info = ConfigRecord(
            {"name": site.name, "num-train-cases": len(train), "num-val-cases": len(val)}
        )
        if cfg.aggregation_weight == "voxels":  # the most this site may weigh, announced once
            info["num-train-voxels"] = site_volume_mm3(train)
        return Message(RecordDict({"site": info}), reply_to=msg)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        ensure_app_logging()
        name = f"node-{context.node_id}"
        try:
            site = resolve_site(context)
            name = site.name
            if is_secure_message(msg):  # a SecAgg+ stage: see fedmed.security.secagg
                return secure_train(msg, context, functools.partial(_train_site, site))
            received = wire.unpack_content(msg.content)
            records = {k: dict(v) for k, v in msg.content.config_records.items()}
            sent, metrics = _train_site(site, context, received, records["config"], records)
            reply = wire.pack({k: sent[k] for k in received})
        except Exception as err:  # the reply must not carry paths: see _error_reply
            return _error_reply(msg, name, err)
        content = RecordDict({**reply, "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        ensure_app_logging()
        name = f"node-{context.node_id}"
        try:
            site = resolve_site(context)
            name = site.name
            cfg = TrainConfig.from_config(msg.content.config_records["config"])
            content = evaluate_message(msg, context, site, _task(site, cfg))
        except Exception as err:  # the reply must not carry paths: see _error_reply
            return _error_reply(msg, name, err)
        return Message(content, reply_to=msg)

    return client_app


app = make_client_app()
