"""The centralized baseline: the same model trained on all sites' training data pooled.

Every site's training split (the same seeded by-patient split the sites use) is pooled into one
:class:`~fedmed.task.SiteTask`, and the model trains in ``num-rounds`` chunks with the same
sample budget as one federated round (``local-epochs`` epochs over the pooled data, or
``local-steps`` x number of sites steps; a share of that with ``sites-per-round``, see
:func:`centralized_steps`), starting from the same initial weights, and is
evaluated on the same held-out folder after each chunk. Like a site in a round, each chunk
starts a fresh optimizer. Records go to ``<out>/metrics.jsonl`` in the federation's format
(one site, ``pooled``), so the federation report draws them.

Example:
    >>> records = train_centralized(settings, sites, out_dir="run/centralized")
    >>> records[-1]["holdout"]["dice"]
    0.71
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fedmed.server.report import MetricsLog, write_report
from fedmed.simulation.sites import link_file
from safetensors.numpy import save_file

from fedmed.globalmodel import build_network, model_arrays
from fedmed.io.msd import DATASET_JSON, load_site_dataset, split_cases
from fedmed.runsettings.settings import RunSettings
from fedmed.scoring import evaluate_folder
from fedmed.task import SiteTask

__all__ = ["CENTRALIZED_MODEL", "centralized_steps", "pooled_training_folder", "train_centralized"]

CENTRALIZED_MODEL = "model.safetensors"  # the baseline's final weights, in its out_dir

logger = logging.getLogger(__name__)

RecordCallback = Callable[[Mapping[str, Any]], None]


def pooled_training_folder(
    sites: Sequence[str | Path], root: str | Path, *, val_fraction: float, seed: int
) -> Path:
    """Write ``root/pooled``: every site's training cases linked in (:func:`link_file`, named
    ``<site>-<file>``) and listed in its ``dataset.json``."""
    out = Path(root) / "pooled"
    training = []
    for sub in ("imagesTr", "labelsTr"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    for folder in sites:
        cases = load_site_dataset(folder).cases
        train, _ = split_cases(cases, val_fraction=val_fraction, seed=seed)
        for case in train:
            entry = {}
            for key, sub in (("image", "imagesTr"), ("label", "labelsTr")):
                name = f"{Path(folder).name}-{Path(case[key]).name}"
                link_file(case[key], out / sub / name)
                entry[key] = f"./{sub}/{name}"
            training.append(entry)
    meta = {
        "name": "pooled",
        "description": "fedmed-sim: the training splits of every site, for centralized training",
        "labels": {"0": "background", "1": "lesion"},
        "numTraining": len(training),
        "training": training,
        "test": [],
    }
    (out / DATASET_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def centralized_steps(settings: RunSettings, *, sites: int, samples_per_epoch: int) -> int:
    """Optimizer steps per round-equivalent (0 = ``local-epochs`` whole epochs).

    The budget of one federated round: ``local-steps`` x the sites that train in a round, or,
    when ``sites-per-round`` samples fewer than all sites, that share of ``local-epochs`` pooled
    epochs (the sampled sites see only their share of the pooled data).

    Example:
        >>> centralized_steps(RunSettings(local_steps=2), sites=3, samples_per_epoch=96)
        6
    """
    trained = min(settings.sites_per_round or sites, sites)
    if settings.local_steps:
        return settings.local_steps * trained
    if trained == sites:
        return 0
    per_epoch = math.ceil(samples_per_epoch / settings.batch_size)
    return max(1, round(settings.local_epochs * per_epoch * trained / sites))


def train_centralized(
    settings: RunSettings,
    sites: Sequence[str | Path],
    *,
    out_dir: str | Path,
    on_record: RecordCallback | None = None,
) -> list[dict[str, Any]]:
    """Train on the pooled training data; returns (and logs) one record per round-equivalent."""
    # imported here: the federation module imports flwr, which the baseline does not need
    from fedmed.server.federation import train_config

    out = Path(out_dir)
    log = MetricsLog(out)
    log.truncate_after(-1)
    pooled = pooled_training_folder(
        sites, out, val_fraction=settings.val_fraction, seed=settings.seed
    )
    cfg0 = train_config(settings, 0)
    task = SiteTask(  # preprocessed as the sites are: the run's plan
        pooled,
        device="auto",
        val_fraction=0.0,
        seed=settings.seed,
        settings=cfg0.plan.pipeline_settings(cache_mode="memory"),
    )
    weights = model_arrays(build_network(cfg0, seed=settings.seed))
    holdout = settings.data_dir

    def evaluate(w: Mapping[str, np.ndarray], cfg: Any) -> dict[str, Any] | None:
        return evaluate_folder(w, holdout, cfg) if holdout else None

    records = [{"round": 0, "status": "initial", "sites": {}, "holdout": evaluate(weights, cfg0)}]
    log.append(records[0])
    steps = centralized_steps(
        settings, sites=len(sites), samples_per_epoch=task.samples_per_epoch(cfg0)
    )
    for server_round in range(1, settings.num_rounds + 1):
        started = time.monotonic()
        cfg = train_config(settings, server_round)
        cfg = dataclasses.replace(cfg, local_steps=steps)
        weights, metrics = task.train_round(weights, cfg)
        record = {
            "round": server_round,
            "attempt": 1,
            "status": "ok",
            "sites": {"pooled": metrics},
            "rejected": {},
            "missing": [],
            "holdout": evaluate(weights, cfg),
            "duration-s": round(time.monotonic() - started, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        log.append(record)
        records.append(record)
        if on_record is not None:
            on_record(record)
    final = {k: np.require(v, requirements="C") for k, v in weights.items()}
    save_file(final, str(out / CENTRALIZED_MODEL))
    write_report(
        out, log.read(), title="fedmed centralized baseline", settings=settings.to_run_config()
    )
    return log.read()
