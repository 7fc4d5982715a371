"""The learning task both federation apps run: model, site pipeline, one local round, evaluation.

The server app and the client app stay thin over this module:

- :class:`TrainConfig` is what the server sends each round (a Flower ``ConfigRecord``) and all
  a site needs to train: model, patch, epochs/steps, learning rate, FedProx ``mu``, FedBN, the
  loss (``dice``, ``dice-ce``, ``nr-dice`` with COPLE-Net's self-ensembling) and the
  preprocessing (:attr:`TrainConfig.plan`: target spacing, CT window or MR z-score).
- :func:`build_network`, :func:`model_arrays`, :func:`local_norm_keys` make the global model,
  its state as numpy arrays, and the normalization statistics a site keeps under ``fedbn``.
- :class:`SiteTask` trains one round on a site's data folder, on the site's hardware
  (:class:`~fedmed.hardware.HardwareSettings`: a LAMP model split over a device list keeps its
  partition), and evaluates on its validation split; :func:`evaluate_folder` runs a model on
  a labelled folder (the server's held-out set);
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
from fedmed.hardware import HardwareSettings
from fedmed.io.guard import require_cases
from fedmed.io.msd import split_cases
from fedmed.io.nifti import read_nifti_header
from fedmed.losses import LOSSES, NR_DENOMINATORS
from fedmed.metrics import DEFAULT_NSD_TOLERANCE_MM, combine_classes, evaluate_case, summarize
from fedmed.nets import build_model
from fedmed.pipeline import (
    HU_WINDOW,
    INTENSITIES,
    PatchSamples,
    PipelineSettings,
    Volumes,
    cached_volumes,
    load_cases,
    patch_loader,
    usable_cases,
)
from fedmed.plan import PreprocessingPlan
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
    "model_options",
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
LAMP_SKIPS = ("carried", "none")
# Comma-separated tuples in the round config, and the type of their entries.
_TUPLES = {"model_features": int, "patch_size": int, "target_spacing": float, "hu_window": float}
# Demo sites with noisy labels keep the clean ones here, beside labelsTr (fedmed.data.demo).
CLEAN_LABELS_DIR = "labelsTrClean"


@dataclass(frozen=True)
class TrainConfig:
    """A round's instructions to a site; travels as a flat ``ConfigRecord`` (``to_config``).

    The last fields are the run settings of the same names (:mod:`fedmed.server.settings`):
    ``loss`` (``auto`` = the model's default: ``nr-dice`` for COPLE-Net, ``dice-ce`` for the
    U-Nets), ``nr_gamma``, ``nr_denominator``, ``self_ensembling`` with ``ema_decay``,
    ``lamp_skips`` (``none``: LAMP's skip-free variant), and the preprocessing
    ``target_spacing`` (mm, ``None`` = native), ``intensity`` and ``hu_window`` (see
    :attr:`plan`).

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
    loss: str = "auto"
    nr_gamma: float = 1.5
    nr_denominator: str = "linear"
    self_ensembling: bool = False
    ema_decay: float = 0.99
    lamp_skips: str = "carried"
    target_spacing: tuple[float, ...] | None = None
    intensity: str = "ct-window"
    hu_window: tuple[float, ...] = HU_WINDOW

    @property
    def spatial_dims(self) -> int:
        """2 for COPLE-Net, 3 for the U-Nets."""
        return 2 if self.model == "coplenet" else 3

    @property
    def loss_name(self) -> str:
        """``loss`` with ``auto`` resolved: ``nr-dice`` for COPLE-Net (its paper's loss),
        ``dice-ce`` for the U-Nets."""
        if self.loss == "auto":
            return "nr-dice" if self.model == "coplenet" else "dice-ce"
        return self.loss

    @property
    def plan(self) -> PreprocessingPlan:
        """The preprocessing this round's model is trained with (spacing, intensity, patch,
        model): what every checkpoint records and what the site pipeline runs
        (:meth:`~fedmed.plan.PreprocessingPlan.pipeline_settings`)."""
        return PreprocessingPlan.from_run_config(
            self.to_config(),
            patch_size=self.patch_size,
            model=self.model,
            model_options=model_options(self),
            source="round config",
        )

    def to_config(self) -> dict[str, int | float | str | bool]:
        """Flat kebab-case values for a Flower ``ConfigRecord``."""
        out: dict[str, int | float | str | bool] = {}
        for name, value in asdict(self).items():
            key = name.replace("_", "-")
            if name in _TUPLES:
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
                if name in _TUPLES:
                    kind = _TUPLES[name]
                    parsed = tuple(kind(v) for v in str(value).split(",") if v.strip())
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
        for key in ("patch_size", "hu_window"):
            if values.get(key) is None:
                raise ConfigError(f"round config {key.replace('_', '-')!r} is empty")
        for key, known in (
            ("loss", ("auto", *LOSSES)),
            ("nr_denominator", NR_DENOMINATORS),
            ("lamp_skips", LAMP_SKIPS),
            ("intensity", INTENSITIES),
        ):
            if values[key] not in known:
                raise ConfigError(
                    f"round config {key.replace('_', '-')!r} is {values[key]!r}: the site knows "
                    f"{', '.join(known)}; update fedmed at the site"
                )
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


def model_options(cfg: TrainConfig) -> dict[str, Any]:
    """The :func:`fedmed.nets.build_model` options of ``cfg``'s network (what a checkpoint's
    plan records as ``model_options``).

    Example:
        >>> model_options(TrainConfig(model="lamp_unet", lamp_skips="none"))["skip_connections"]
        False
    """
    options: dict[str, Any] = {"in_channels": cfg.in_channels, "out_channels": cfg.out_channels}
    if cfg.model_features:
        options["features"] = tuple(cfg.model_features)
    if cfg.model == "coplenet":
        options["norm"] = cfg.model_norm
    if cfg.model == "lamp_unet" and cfg.lamp_skips == "none":
        options["skip_connections"] = False
    return options


def build_network(cfg: TrainConfig, *, seed: int | None = None) -> nn.Module:
    """The configured network; ``seed`` fixes its initial weights without touching global RNG."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return build_model(cfg.model, **model_options(cfg))


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
    model.to(resolve_device(device))
    settings = settings or cfg.plan.pipeline_settings()
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
        options = local_config(cfg)
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


def local_config(cfg: TrainConfig) -> LocalConfig:
    """The :class:`fedmed.train.TrainConfig` of a round: its loss (``auto``: COPLE-Net trains
    with the noise-robust Dice, the U-Nets with Dice + cross-entropy), self-ensembling and
    optimizer settings (``dataclasses.replace`` changes the rest)."""
    return LocalConfig(
        epochs=cfg.local_epochs,
        steps=cfg.local_steps or None,
        lr=cfg.lr,
        proximal_mu=cfg.proximal_mu,
        loss=cfg.loss_name,  # type: ignore[arg-type]  # checked by LocalConfig
        gamma=cfg.nr_gamma,
        nr_denominator=cfg.nr_denominator,  # type: ignore[arg-type]
        self_ensembling=cfg.self_ensembling,
        ema_alpha=cfg.ema_decay,
    )


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
