"""A model scored on labelled volumes: Dice, HD95, NSD and volume error per case, and their
summary; on a preprocessed set (:func:`evaluate_model`, a site's validation split) or on a
labelled folder (:func:`evaluate_folder`, the server's held-out set).

The predictions come from :mod:`fedmed.predict` (which ``fedmed infer`` uses too); the
per-case metrics and the summary from :mod:`fedmed.metrics`.

Example:
    >>> result = evaluate_folder(weights, "demo/data/holdout", cfg, device="cpu")
    >>> result["dice"], result["dice_n"], len(result["cases"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fedmed.devices import parse_devices
from fedmed.globalmodel import build_network, load_arrays
from fedmed.hardware import HardwareSettings
from fedmed.metrics import evaluate_case
from fedmed.pipeline import PipelineSettings, Volumes, cached_volumes, load_cases
from fedmed.predict import adapt_norm_statistics, predict_volume
from fedmed.roundconfig import TrainConfig
from fedmed.summary import combine_classes, summarize

__all__ = ["evaluate_folder", "evaluate_model"]


def evaluate_model(
    model: nn.Module,
    volumes: Volumes,
    cfg: TrainConfig,
    *,
    nsd_tolerance_mm: float | None = None,
    hardware: HardwareSettings | None = None,
) -> dict[str, Any]:
    """Dice, HD95 (mm), NSD and volume error of ``model`` on preprocessed labelled ``volumes``
    (NSD at ``nsd_tolerance_mm``, default the run's ``cfg.nsd_tolerance_mm``); ``hardware``
    sets the site's mixed precision and memory layout for the predictions (a model split over
    devices keeps its placement either way).

    Each case record (``cases``) has ``case``, ``dice``, ``hd95``, ``nsd``, ``rve`` (means over
    the foreground classes where defined) and ``missed``, ``spurious``, ``both_empty`` (the
    number of foreground classes so flagged; see :mod:`fedmed.metrics` for the edge cases),
    plus the per-class keys (``dice_1``, ``missed_1``, ...) when ``out_channels > 2``. The
    summary (:func:`fedmed.summary.summarize`) gives each metric's mean over the cases where it
    is defined with its count (``dice``, ``dice_n``, ``hd95``, ``hd95_n``, ...), ``n_cases``,
    ``n_missed``, ``n_spurious`` and ``n_both_empty``.

    Example:
        >>> result = evaluate_model(model, volumes, cfg, nsd_tolerance_mm=2.0)
        >>> result["hd95"], result["hd95_n"], result["n_missed"], result["cases"][0]["nsd"]
    """
    tolerance = cfg.nsd_tolerance_mm if nsd_tolerance_mm is None else nsd_tolerance_mm
    classes = list(range(1, cfg.out_channels))
    per_case = []
    for index in range(len(volumes)):
        item = volumes[index]
        pred = predict_volume(model, item["image"], cfg, hardware=hardware)
        spacing = item.get("image_meta", {}).get("spacing")
        m = evaluate_case(
            pred.numpy(),
            item["label"][0].numpy(),
            num_classes=cfg.out_channels,
            spacing=spacing,
            nsd_tolerance_mm=tolerance,
        )
        per_case.append(
            {
                "case": str(item.get("case_id", index)),
                **combine_classes(m, classes, keep_classes=cfg.out_channels > 2),
            }
        )
    return {**summarize(per_case), "cases": per_case}


def evaluate_folder(
    weights: Mapping[str, np.ndarray],
    folder: str | Path,
    cfg: TrainConfig,
    *,
    device: str = "auto",
    adapt_norm: bool = False,
    settings: PipelineSettings | None = None,
) -> dict[str, Any]:
    """Dice and HD95 (mm) of ``weights`` on every labelled case of ``folder``
    (:func:`evaluate_model`'s result), preprocessed as ``settings`` says (default: the round's
    plan, ``cfg.plan``: the sites' spacing and intensity normalization).

    ``weights`` may lack the normalization layers (FedBN); ``adapt_norm`` then re-estimates
    their statistics on the folder's images (:func:`adapt_norm_statistics`) before predicting.
    """
    model = build_network(cfg)
    load_arrays(model, weights, partial=True)
    model.to(parse_devices(device, key="device")[0])
    settings = settings or cfg.plan.pipeline_settings()
    settings = dataclasses.replace(
        settings, guard=dataclasses.replace(settings.guard, num_classes=cfg.out_channels)
    )
    volumes = cached_volumes(load_cases([folder], settings), settings)
    if adapt_norm:
        adapt_norm_statistics(model, [volumes[i]["image"] for i in range(len(volumes))], cfg)
    return evaluate_model(model, volumes, cfg)
