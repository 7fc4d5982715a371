"""A site's learning task: its data folder split and cached, one local round, its validation.

:class:`SiteTask` trains one round on a site's data folder, on the site's hardware
(:class:`~fedmed.hardware.HardwareSettings`: a LAMP model split over a device list keeps its
partition), and evaluates on its validation split (:mod:`fedmed.scoring`). What the round
asks for is the round config (:class:`~fedmed.roundconfig.TrainConfig`); the network and its
weights as arrays are :mod:`fedmed.globalmodel`; the data pipeline is :mod:`fedmed.pipeline`
(cached preprocessing) and :mod:`fedmed.patches` (random patches, batches). COPLE-Net trains
on 2D axial patches and predicts whole slices; the U-Nets train on 3D patches and predict
with a sliding window.

Example:
    >>> cfg = TrainConfig(model="coplenet", model_features=(8, 16, 32, 64, 128),
    ...                   patch_size=(32, 32), local_steps=2, batch_size=2)
    >>> task = SiteTask("demo/data/site-A", seed=0)
    >>> arrays, metrics = task.train_round(model_arrays(build_network(cfg, seed=0)), cfg)
    >>> sorted(metrics)[:2]
    ['num-examples', 'num-steps']
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmed.globalmodel import build_network, load_arrays, model_arrays
from fedmed.hardware import HardwareSettings
from fedmed.io.guard import require_cases
from fedmed.io.msd import split_cases
from fedmed.io.nifti import read_nifti_header
from fedmed.patches import PatchSamples, patch_loader
from fedmed.pipeline import PipelineSettings, Volumes, cached_volumes, load_cases, usable_cases
from fedmed.roundconfig import TrainConfig, trainer_config
from fedmed.scoring import evaluate_model
from fedmed.text import printable
from fedmed.train import LocalTrainer, TrainResult

__all__ = [
    "CLEAN_LABELS_DIR",
    "REPORTED_SUMMARY",
    "SiteTask",
    "ensure_app_logging",
    "site_volume_mm3",
]

logger = logging.getLogger(__name__)

# What a site reports of a validation summary each round (as ``val-<key>``).
REPORTED_SUMMARY = ("dice", "hd95", "nsd", "n_cases", "n_missed", "n_spurious", "n_both_empty")
# Demo sites with noisy labels keep the clean ones here, beside labelsTr (fedmed.data.demo).
CLEAN_LABELS_DIR = "labelsTrClean"


def ensure_app_logging() -> None:
    """Flower's app processes leave fedmed's loggers without a handler: add one (INFO, with
    time) unless the host application configured ``fedmed`` logging already."""
    root = logging.getLogger("fedmed")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def site_volume_mm3(cases: Sequence[Mapping[str, str]]) -> float:
    """Total volume (mm^3) of the cases' images, from their NIfTI headers: the aggregation
    weight ``voxels`` (voxels at 1 mm isotropic spacing)."""
    total = 0.0
    for case in cases:
        shape, affine = read_nifti_header(case["image"])
        total += math.prod(shape[:3]) * abs(float(np.linalg.det(affine[:3, :3])))
    return total


class SiteTask:
    """One site's data and its local training round.

    Args:
        data_dir: the site's data folder (MSD layout or ``*_img``/``*_seg`` pairs).
        cache_dir: where the disk cache lives (``cache_mode`` ``disk``/``disk-encrypted``).
        cache_mode: ``memory`` (cache volumes in RAM), ``disk``, ``disk-encrypted`` or ``none``
            (see :class:`~fedmed.pipeline.PipelineSettings`, which ``settings`` overrides; a
            round's plan makes them: :meth:`~fedmed.plan.PreprocessingPlan.pipeline_settings`).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` or a device list ``"cuda:0,cuda:1"``
            that splits a LAMP model; shorthand for ``hardware``'s devices.
        hardware: the site's :class:`~fedmed.hardware.HardwareSettings` (devices, LAMP
            micro-batches and checkpointing, AMP, channels-last, compile); give this or
            ``device``.
        val_fraction, seed: the deterministic by-patient train/validation split.

    Validation cases whose clean label exists (``labelsTrClean/<name>`` beside
    ``labelsTr/<name>``: the demo's noisy site, :mod:`fedmed.data.demo`) are also scored against
    it: :meth:`evaluate` adds ``dice-clean``.

    Example:
        >>> task = SiteTask("demo/data/site-A", device="cpu,cpu")
        >>> task.num_train_cases + task.num_val_cases
        6
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        cache_dir: str | Path | None = None,
        cache_mode: str = "memory",
        device: str = "auto",
        hardware: HardwareSettings | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        settings: PipelineSettings | None = None,
    ) -> None:
        if settings is None:
            settings = PipelineSettings(
                cache_mode=cache_mode, cache_dir=Path(cache_dir) if cache_dir else None
            )
        self.hardware = hardware or HardwareSettings(devices=device)
        cases = load_cases([data_dir], settings)
        train, val = split_cases(cases, val_fraction=val_fraction, seed=seed)
        where = printable(Path(data_dir).absolute())
        require_cases(len(train), len(val), where=where)
        self.name = printable(Path(data_dir).name)  # for the site's own log
        self.device = self.hardware.devices[0]  # a partitioned model's input device
        self.settings = settings
        self.train = cached_volumes(train, settings)
        self.val = cached_volumes(val, settings)
        require_cases(len(self.train), len(self.val), where=where)
        self.num_train_cases, self.num_val_cases = len(self.train), len(self.val)
        self.train_cases = usable_cases(train, self.train)
        clean = _with_clean_labels(usable_cases(val, self.val))
        self.val_clean: Volumes | None = cached_volumes(clean, settings) if clean else None
        self._volume_mm3: float | None = None
        self._split_logged = False

    def samples_per_epoch(self, cfg: TrainConfig) -> int:
        """Training samples in one local epoch (2D: every axial slice; 3D: patches per case)."""
        return len(PatchSamples(self.train, cfg.patch_size, seed=0))

    def aggregation_weight(self, cfg: TrainConfig) -> float:
        """What this site's update weighs in the average: its training cases, or (``voxels``)
        the volume of its training images in mm^3."""
        if cfg.aggregation_weight == "voxels":
            if self._volume_mm3 is None:
                self._volume_mm3 = site_volume_mm3(self.train_cases)
            return self._volume_mm3
        return float(self.num_train_cases)

    def model(
        self,
        cfg: TrainConfig,
        arrays: Mapping[str, np.ndarray],
        *,
        local_arrays: Mapping[str, np.ndarray] | None = None,
    ) -> nn.Module:
        """The network with ``arrays`` loaded over the site's own ``local_arrays``, placed on
        the site's devices (a LAMP model split over a device list); ConfigError naming
        ``device`` for a list and a model that cannot be split."""
        model = build_network(cfg, seed=cfg.seed)
        if local_arrays:
            load_arrays(model, local_arrays, partial=True)
        load_arrays(model, arrays, partial=True)
        model = self.hardware.prepare(model, sample_shape=_sample_shape(cfg))
        stages = getattr(model, "placement", None)
        if stages is not None and len(stages.sizes) > 1 and not self._split_logged:
            logger.info(
                "%s: %s split over %s: %s cells per device",
                self.name,
                cfg.model,
                ",".join(str(d) for d in stages.devices),
                "+".join(str(n) for n in stages.sizes),
            )
            self._split_logged = True
        return model

    def evaluate(self, model: nn.Module, cfg: TrainConfig) -> dict[str, float]:
        """Validation summary of ``model`` as flat metrics (:data:`REPORTED_SUMMARY`: Dice,
        HD95, NSD and the case counts, plus ``dice-clean`` where the site has clean labels);
        empty when the site has no validation cases."""
        if not len(self.val):
            return {}
        summary = evaluate_model(model, self.val, cfg, hardware=self.hardware)
        out = {
            k: float(summary[k])
            for k in REPORTED_SUMMARY
            if k in summary and math.isfinite(summary[k])
        }
        if self.val_clean is not None:
            clean = evaluate_model(model, self.val_clean, cfg, hardware=self.hardware)
            if math.isfinite(clean.get("dice", math.nan)):
                out["dice-clean"] = float(clean["dice"])
        return out

    def fit(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        *,
        proximal_mu: float | None = None,
        anchor: Mapping[str, torch.Tensor] | None = None,
        seed_salt: int = 0,
        steps: int | None = None,
    ) -> TrainResult:
        """Train ``model`` in place for one round of ``cfg`` (or ``steps`` optimizer steps),
        on patches drawn with the round's seed; ``proximal_mu``/``anchor`` override FedProx."""
        round_seed = int(
            np.random.default_rng([cfg.seed, cfg.server_round, seed_salt]).integers(2**31)
        )
        batches = patch_loader(
            self.train, patch_size=cfg.patch_size, batch_size=cfg.batch_size, seed=round_seed
        )
        options = trainer_config(cfg)
        if proximal_mu is not None:
            options = dataclasses.replace(options, proximal_mu=proximal_mu)
        if steps is not None:
            options = dataclasses.replace(options, steps=steps)
        trainer = LocalTrainer(
            model, config=options, hardware=self.hardware, sample_shape=_sample_shape(cfg)
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(round_seed)
            # anchor None: the FedProx anchor is the model as loaded (global weights, plus the
            # site's own normalization statistics under FedBN)
            return trainer.fit(batches, global_weights=anchor, progress=False)

    def train_round(
        self,
        global_arrays: Mapping[str, np.ndarray],
        cfg: TrainConfig,
        *,
        local_arrays: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Train from ``global_arrays`` (plus the site's own ``local_arrays``, FedBN) and
        evaluate on the validation split.

        Returns every array of the trained model and scalar metrics: ``num-examples`` (the
        aggregation weight: training cases, or mm^3 with ``aggregation-weight = voxels``),
        ``num-samples`` (patches or slices trained on), ``num-steps``, ``train-loss``, the
        validation summary as ``val-<key>`` (``val-dice``, ``val-hd95``, ``val-nsd``, counts),
        ``train-seconds``.
        """
        start = time.perf_counter()
        model = self.model(cfg, global_arrays, local_arrays=local_arrays)
        result = self.fit(model, cfg)
        metrics = self.round_metrics(cfg, result)
        metrics.update({f"val-{k}": v for k, v in self.evaluate(model, cfg).items()})
        metrics["train-seconds"] = time.perf_counter() - start
        return model_arrays(model), metrics

    def round_metrics(self, cfg: TrainConfig, result: TrainResult) -> dict[str, float]:
        """The training figures of a round's reply (see :meth:`train_round`)."""
        return {
            "num-examples": self.aggregation_weight(cfg),
            "num-samples": float(result.steps * cfg.batch_size),
            "num-steps": float(result.steps),
            "train-loss": float(result.loss),
        }


def _sample_shape(cfg: TrainConfig) -> tuple[int, ...]:
    """The input LAMP's partitioner profiles: one training patch."""
    return (1, cfg.in_channels, *cfg.patch_size)


def _with_clean_labels(cases: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The cases with their label replaced by the clean one where ``labelsTrClean`` holds it
    (all of them, or none: a partial set would score another set of cases)."""
    out = []
    for case in cases:
        label = Path(str(case["label"]))
        clean = label.parent.parent / CLEAN_LABELS_DIR / label.name
        if not clean.is_file():
            return []
        out.append({**case, "label": str(clean)})
    return out
