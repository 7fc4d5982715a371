"""A site's part of the end-of-run evaluation: its own models, and every model on its split.

At the end of a run the server sends each site the global models (final, best, and reference
models such as the centralized baseline in simulation). The site:

1. builds its own models from the run: ``finetuned`` (the final global model trained
   ``finetune-epochs`` more local epochs: local fine-tuning), ``ditto`` (its Ditto personal
   model, when the run trained one) and ``local-only`` (with ``local-baselines``: a model
   trained from the run's initial weights on this site's data alone, for as many samples as
   the site trained on during the federated run: FLamby's protocol);
2. evaluates every model on its validation split, a received model with the site's own batch
   norm statistics under FedBN (its personalized statistics);
3. discloses per model and metric only :func:`fedmed.stats.summarize_cases` entries: n, mean,
   bootstrap interval, worst-decile mean, and nothing but "too few cases" below its disclosure
   floor. Per-case values never leave the site.

Entries are plain dicts ``{"model", "data", "metric", "n", "n_undefined", "status", "mean",
"ci_low", "ci_high", "worst_decile"}``; ``data`` is ``val:<site>``. A site's own model labels
carry its name: ``finetuned@A``.

Example:
    >>> own = own_models(task, cfg, state, final=weights, finetune_epochs=1,
    ...                  local_baseline=False)
    >>> entries = evaluate_models(task, cfg, {"global-final": weights, **own}, site="A",
    ...                           local=state.norm, floor=5)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedmed.globalmodel import build_network, model_arrays
from fedmed.roundconfig import TrainConfig
from fedmed.scoring import evaluate_model
from fedmed.siteround import SiteState
from fedmed.stats import summarize_cases
from fedmed.task import SiteTask

__all__ = ["evaluate_models", "own_models", "summary_entries"]

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
_SALT_FINETUNE, _SALT_LOCAL = 2, 3  # distinct patch streams from the rounds' (salt 0 and 1)


def own_models(
    task: SiteTask,
    cfg: TrainConfig,
    state: SiteState,
    *,
    final: Mapping[str, np.ndarray],
    finetune_epochs: int,
    local_baseline: bool,
) -> dict[str, Arrays]:
    """The site's own models of the run (see the module docstring), by label."""
    local = state.norm if cfg.fedbn else {}
    models: dict[str, Arrays] = {}
    if finetune_epochs > 0:
        model = task.model(cfg, final, local_arrays=local)
        tuned = dataclasses.replace(cfg, local_epochs=finetune_epochs, local_steps=0)
        task.fit(model, tuned, proximal_mu=0.0, seed_salt=_SALT_FINETUNE)
        models["finetuned"] = model_arrays(model)
    if state.personal:
        models["ditto"] = dict(state.personal)
    if local_baseline:
        steps = max(1, math.ceil(state.samples / cfg.batch_size))
        logger.info(
            "local-only baseline: %d steps (%g samples, as in the run)", steps, state.samples
        )
        model = task.model(cfg, model_arrays(build_network(cfg, seed=cfg.seed)))
        task.fit(model, cfg, proximal_mu=0.0, steps=steps, seed_salt=_SALT_LOCAL)
        models["local-only"] = model_arrays(model)
    return models


def summary_entries(
    model: str, data: str, cases: list[Mapping[str, Any]], *, floor: int, seed: int = 0
) -> list[dict[str, Any]]:
    """One entry per metric of ``model`` on ``data`` from per-case records."""
    return [
        {"model": model, "data": data, "metric": metric, **summary}
        for metric, summary in summarize_cases(cases, floor=floor, seed=seed).items()
    ]


def evaluate_models(
    task: SiteTask,
    cfg: TrainConfig,
    models: Mapping[str, Mapping[str, np.ndarray]],
    *,
    site: str,
    local: Mapping[str, np.ndarray],
    floor: int,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """``(entries, scores)``: the disclosable entries of every model on the site's validation
    split, and per model the plain validation Dice and case count (the same figures a round's
    reply carries; the server selects its best model with them)."""
    entries: list[dict[str, Any]] = []
    scores: dict[str, dict[str, float]] = {}
    if not len(task.val):
        return entries, scores
    for label, arrays in models.items():
        model = task.model(cfg, arrays, local_arrays=local if cfg.fedbn else None)
        result = evaluate_model(model, task.val, cfg, hardware=task.hardware)
        entries += summary_entries(label, f"val:{site}", result["cases"], floor=floor)
        scores[label] = {"dice": float(result["dice"]), "n_cases": float(len(result["cases"]))}
    return entries, scores
