"""The learning task both federation apps run: model, site pipeline, one local round, evaluation.

The server app and the client app stay thin over this module:

- :class:`TrainConfig` is what the server sends each round (a Flower ``ConfigRecord``) and all
  a site needs to train: model, patch, epochs/steps, learning rate, FedProx ``mu``, FedBN.
- :func:`build_network`, :func:`model_arrays`, :func:`local_norm_keys` make the global model,
  its state as numpy arrays, and the normalization statistics a site keeps under ``fedbn``.
- :class:`SiteTask` trains one round on a site's data folder and evaluates on its validation
  split; :func:`evaluate_folder` runs a model on a labelled folder (the server's held-out set);
  the predictions come from :mod:`fedmed.predict` (which ``fedmed infer`` uses too).

The data pipeline (cached preprocessing, random patches, batches) is :mod:`fedmed.pipeline`.
COPLE-Net trains on 2D axial patches and predicts whole slices; the U-Nets train on 3D patches
and predict with a sliding window.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmed.errors import ConfigError, ModelError
from fedmed.io.guard import require_cases
from fedmed.io.msd import split_cases
from fedmed.io.nifti import read_nifti_header
from fedmed.metrics import DEFAULT_NSD_TOLERANCE_MM, combine_classes, evaluate_case, summarize
from fedmed.nets import build_model
from fedmed.pipeline import (
    PatchSamples,
    PipelineSettings,
    Volumes,
    cached_volumes,
    load_cases,
    patch_loader,
    usable_cases,
)
from fedmed.predict import adapt_norm_statistics, predict_volume
from fedmed.text import printable
from fedmed.train import LocalTrainer, TrainResult
from fedmed.train import TrainConfig as LocalConfig

__all__ = [
    "SiteTask",
    "TrainConfig",
    "build_network",
    "ensure_app_logging",
    "evaluate_folder",
    "evaluate_model",
    "load_arrays",
    "local_config",
    "local_norm_keys",
    "model_arrays",
    "resolve_device",
    "site_volume_mm3",
]

logger = logging.getLogger(__name__)

# SiloBN: only the running statistics of batch norm stay at a site (instance norm, group norm
# and layer norm keep none; their affine weights are shared like every other weight).
_LOCAL_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
AGGREGATION_WEIGHTS = ("cases", "voxels")
# What a site reports of a validation summary each round (as ``val-<key>``).
REPORTED_SUMMARY = ("dice", "hd95", "nsd", "n_cases", "n_missed", "n_spurious", "n_both_empty")


@dataclass(frozen=True)
class TrainConfig:
    """A round's instructions to a site; travels as a flat ``ConfigRecord`` (``to_config``).

    Example:
        >>> cfg = TrainConfig(lr=0.01, proximal_mu=0.1)
        >>> TrainConfig.from_config(cfg.to_config()) == cfg
        True
    """

    model: str = "coplenet"
    model_features: tuple[int, ...] | None = None
    in_channels: int = 1
    out_channels: int = 2
    patch_size: tuple[int, ...] = (96, 96)
    local_epochs: int = 1
    local_steps: int = 0
    lr: float = 1e-3
    batch_size: int = 4
    proximal_mu: float = 0.0
    fedbn: bool = False
    val_fraction: float = 0.2
    seed: int = 0
    server_round: int = 0
    run_id: str = ""
    aggregation_weight: str = "cases"
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
    ditto_lambda: float = 0.0
    scaffold: bool = False
    model_norm: str = "batch"

    @property
    def spatial_dims(self) -> int:
        """2 for COPLE-Net, 3 for the U-Nets."""
        return 2 if self.model == "coplenet" else 3

    def to_config(self) -> dict[str, int | float | str | bool]:
        """Flat kebab-case values for a Flower ``ConfigRecord``."""
        out: dict[str, int | float | str | bool] = {}
        for name, value in asdict(self).items():
            key = name.replace("_", "-")
            if name in ("model_features", "patch_size"):
                value = ",".join(str(v) for v in value) if value else ""
            out[key] = value
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainConfig:
        """Parse :meth:`to_config`'s output; ConfigError names a missing or bad key."""
        values: dict[str, Any] = {}
        for name, default in asdict(cls()).items():
            key = name.replace("_", "-")
            if key not in config:
                raise ConfigError(f"round config lacks {key!r}: server and site versions differ?")
            value = config[key]
            try:
                if name in ("model_features", "patch_size"):
                    parsed = tuple(int(v) for v in str(value).split(",") if v.strip())
                    value = parsed or None
                elif isinstance(default, bool):
                    value = bool(value)
                elif isinstance(default, int):
                    value = int(value)
                elif isinstance(default, float):
                    value = float(value)
                elif isinstance(default, str):
                    value = str(value)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"round config {key!r} is invalid: {value!r}") from err
            values[name] = value
        if values.get("patch_size") is None:
            raise ConfigError("round config 'patch-size' is empty")
        if values["aggregation_weight"] not in AGGREGATION_WEIGHTS:
            raise ConfigError(
                f"round config 'aggregation-weight' is {values['aggregation_weight']!r}: the "
                f"site knows {', '.join(AGGREGATION_WEIGHTS)}; update fedmed at the site"
            )
        return cls(**values)


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


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given."""
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_network(cfg: TrainConfig, *, seed: int | None = None) -> nn.Module:
    """The configured network; ``seed`` fixes its initial weights without touching global RNG."""
    options: dict[str, object] = {"in_channels": cfg.in_channels, "out_channels": cfg.out_channels}
    if cfg.model_features:
        options["features"] = cfg.model_features
    if cfg.model == "coplenet":
        options["norm"] = cfg.model_norm
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return build_model(cfg.model, **options)


def local_norm_keys(model: nn.Module) -> frozenset[str]:
    """state_dict keys a site keeps under ``fedbn`` (SiloBN, Andreux et al. 2020): the running
    statistics of every batch-norm layer. The affine weights are shared, so the global model
    is one that the sites trained; a site's own statistics make its personalized model."""
    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for name in _LOCAL_NORM_BUFFERS:
                if getattr(module, name, None) is not None:
                    keys.add(f"{prefix}.{name}" if prefix else name)
    return frozenset(keys)


def site_volume_mm3(cases: Sequence[Mapping[str, str]]) -> float:
    """Total volume (mm^3) of the cases' images, from their NIfTI headers: the aggregation
    weight ``voxels`` (voxels at 1 mm isotropic spacing)."""
    total = 0.0
    for case in cases:
        shape, affine = read_nifti_header(case["image"])
        total += math.prod(shape[:3]) * abs(float(np.linalg.det(affine[:3, :3])))
    return total


def model_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict as CPU numpy arrays (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_arrays(
    model: nn.Module, arrays: Mapping[str, np.ndarray], *, partial: bool = False
) -> None:
    """Load numpy ``arrays`` into ``model``; ``partial`` allows a subset (FedBN's shared keys).

    Raises ModelError naming the first unknown key or mismatched shape.
    """
    state = model.state_dict()
    unknown = sorted(set(arrays) - set(state))
    missing = sorted(set(state) - set(arrays))
    if unknown or (missing and not partial):
        raise ModelError(
            f"weights do not fit model {type(model).__name__}: unknown keys {unknown[:3]}, "
            f"missing keys {missing[:3]}: server and site must use the same model settings"
        )
    for key, value in arrays.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise ModelError(
                f"weight {key!r} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(state[key].shape)}: check model and model-features"
            )
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, strict=not partial
    )


def evaluate_model(
    model: nn.Module,
    volumes: Volumes,
    cfg: TrainConfig,
    *,
    nsd_tolerance_mm: float | None = None,
) -> dict[str, Any]:
    """Dice, HD95 (mm), NSD and volume error of ``model`` on preprocessed labelled ``volumes``
    (NSD at ``nsd_tolerance_mm``, default the run's ``cfg.nsd_tolerance_mm``).

    Each case record (``cases``) has ``case``, ``dice``, ``hd95``, ``nsd``, ``rve`` (means over
    the foreground classes where defined) and ``missed``, ``spurious``, ``both_empty`` (the
    number of foreground classes so flagged; see :mod:`fedmed.metrics` for the edge cases),
    plus the per-class keys (``dice_1``, ``missed_1``, ...) when ``out_channels > 2``. The
    summary (:func:`fedmed.metrics.summarize`) gives each metric's mean over the cases where it
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
        pred = predict_volume(model, item["image"], cfg)
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
    (:func:`evaluate_model`'s result).

    ``weights`` may lack the normalization layers (FedBN); ``adapt_norm`` then re-estimates
    their statistics on the folder's images (:func:`adapt_norm_statistics`) before predicting.
    """
    model = build_network(cfg)
    load_arrays(model, weights, partial=True)
    model.to(resolve_device(device))
    settings = settings or PipelineSettings()
    settings = dataclasses.replace(
        settings, guard=dataclasses.replace(settings.guard, num_classes=cfg.out_channels)
    )
    volumes = cached_volumes(load_cases([folder], settings), settings)
    if adapt_norm:
        adapt_norm_statistics(model, [volumes[i]["image"] for i in range(len(volumes))], cfg)
    return evaluate_model(model, volumes, cfg)


class SiteTask:
    """One site's data and its local training round.

    Args:
        data_dir: the site's data folder (MSD layout or ``*_img``/``*_seg`` pairs).
        cache_dir: where the disk cache lives (``cache_mode`` ``disk``/``disk-encrypted``).
        cache_mode: ``memory`` (cache volumes in RAM), ``disk``, ``disk-encrypted`` or ``none``
            (see :class:`~fedmed.pipeline.PipelineSettings`, which ``settings`` overrides).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...
        val_fraction, seed: the deterministic by-patient train/validation split.

    Example:
        >>> task = SiteTask("demo/data/site-A")
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
        val_fraction: float = 0.2,
        seed: int = 0,
        settings: PipelineSettings | None = None,
    ) -> None:
        if settings is None:
            settings = PipelineSettings(
                cache_mode=cache_mode, cache_dir=Path(cache_dir) if cache_dir else None
            )
        cases = load_cases([data_dir], settings)
        train, val = split_cases(cases, val_fraction=val_fraction, seed=seed)
        where = printable(Path(data_dir).absolute())
        require_cases(len(train), len(val), where=where)
        self.device = resolve_device(device)
        self.settings = settings
        self.train = cached_volumes(train, settings)
        self.val = cached_volumes(val, settings)
        require_cases(len(self.train), len(self.val), where=where)
        self.num_train_cases, self.num_val_cases = len(self.train), len(self.val)
        self.train_cases = usable_cases(train, self.train)
        self._volume_mm3: float | None = None

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
        """The network with ``arrays`` loaded over the site's own ``local_arrays``, on the
        site's device."""
        model = build_network(cfg, seed=cfg.seed)
        if local_arrays:
            load_arrays(model, local_arrays, partial=True)
        load_arrays(model, arrays, partial=True)
        return model.to(self.device)

    def evaluate(self, model: nn.Module, cfg: TrainConfig) -> dict[str, float]:
        """Validation summary of ``model`` as flat metrics (:data:`REPORTED_SUMMARY`: Dice,
        HD95, NSD and the case counts); empty when the site has no validation cases."""
        if not len(self.val):
            return {}
        summary = evaluate_model(model, self.val, cfg)
        return {
            k: float(summary[k])
            for k in REPORTED_SUMMARY
            if k in summary and math.isfinite(summary[k])
        }

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
        options = local_config(cfg)
        if proximal_mu is not None:
            options = dataclasses.replace(options, proximal_mu=proximal_mu)
        if steps is not None:
            options = dataclasses.replace(options, steps=steps)
        trainer = LocalTrainer(model, config=options, device=self.device)
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


def local_config(cfg: TrainConfig) -> LocalConfig:
    """The :class:`fedmed.train.TrainConfig` of a round: COPLE-Net trains with the
    noise-robust Dice loss, the U-Nets with Dice + cross-entropy (``dataclasses.replace``
    changes the rest)."""
    return LocalConfig(
        epochs=cfg.local_epochs,
        steps=cfg.local_steps or None,
        lr=cfg.lr,
        proximal_mu=cfg.proximal_mu,
        loss="nr_dice" if cfg.model == "coplenet" else "dice_ce",
    )
