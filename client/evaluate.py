"""The site's ``evaluate`` handler: its part of the end-of-run (cross-site) evaluation.

The server's message (see :mod:`fedmed.server.evaluation`) holds:

- the models to evaluate, packed in one payload (:mod:`fedmed.wire`) with keys
  ``<label>::<state_dict key>`` (``global-final``, ``global-best``, ``centralized``, and in the
  second stage other sites' models such as ``finetuned@B``);
- ConfigRecord ``config``: the run's last round config
  (:class:`~fedmed.roundconfig.TrainConfig`, with ``run-id``);
- ConfigRecord ``evaluation``: ``own-models`` (build this site's own models: fine-tuned, Ditto,
  local-only), ``finetune-epochs``, ``local-baseline``, ``send-models`` (the server may
  evaluate models that travel; DP runs never ask).

The reply holds ConfigRecord ``results`` with ``entries`` (JSON of
:func:`fedmed.crosssite.evaluate_models`'s disclosable summaries) and MetricRecord ``metrics``
with ``<label>-val-dice`` and ``<label>-val-n_cases`` per received model (the figures a round's
reply gives, which the server selects its best model by). Only when the server asked and the
site's config allows it (``share-models = true``, off by default) do the site's own models
travel back, packed like the received ones; otherwise they never leave the site.

Example:
    >>> reply = evaluate_message(msg, context, site, task)
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedmed import wire
from fedmed.crosssite import evaluate_models, own_models
from fedmed.globalmodel import build_network, model_arrays
from fedmed.roundconfig import TrainConfig
from fedmed.task import SiteTask

from .local_state import StateStore

__all__ = ["evaluate_message"]

logger = logging.getLogger(__name__)

_MAX_RESULTS = 1 << 20  # bytes of JSON entries in one reply


def evaluate_message(msg: Message, context: Context, site: Any, task: SiteTask) -> RecordDict:
    """The reply content for an ``evaluate`` message (see the module docstring)."""
    config = dict(msg.content.config_records["config"])
    options = dict(msg.content.config_records.get("evaluation", ConfigRecord()))
    cfg = TrainConfig.from_config(config)
    received = wire.split_models(wire.unpack_content(msg.content))
    store = StateStore(context, cache_dir=site.cache_dir)
    state = store.load(cfg.run_id, reference=model_arrays(build_network(cfg)))
    own: dict[str, dict[str, np.ndarray]] = {}
    if options.get("own-models") is True and "global-final" in received:
        built = own_models(
            task,
            cfg,
            state,
            final=received["global-final"],
            finetune_epochs=int(options.get("finetune-epochs", 0)),
            local_baseline=options.get("local-baseline") is True,
        )
        own = {f"{label}@{site.name}": arrays for label, arrays in built.items()}
    logger.info(
        "site %s: end-of-run evaluation of %s",
        site.name,
        ", ".join([*received, *own]) or "no model",
    )
    entries, scores = evaluate_models(
        task,
        cfg,
        {**received, **own},
        site=site.name,
        local=state.norm,
        floor=site.disclosure_floor,
    )
    metrics: dict[str, float] = {}
    for label, score in scores.items():
        if label in received and math.isfinite(score["dice"]):
            metrics[f"{label}-val-dice"] = score["dice"]
            metrics[f"{label}-val-n_cases"] = score["n_cases"]
    text = json.dumps(entries, allow_nan=False)
    if len(text) > _MAX_RESULTS:
        raise ValueError(f"the evaluation results take {len(text)} bytes: at most {_MAX_RESULTS}")
    content: dict[str, Any] = {
        "results": ConfigRecord({"entries": text}),
        "metrics": MetricRecord(metrics),
    }
    if own and options.get("send-models") is True and site.share_models:
        content.update(wire.pack(wire.join_models(own)))
    return RecordDict(content)
