"""The learning task both federation apps run: model, site pipeline, one local round, evaluation.

The server app and the client app stay thin over this module:

- :class:`TrainConfig` is what the server sends each round (a Flower ``ConfigRecord``) and all
  a site needs to train: model, patch, epochs/steps, learning rate, FedProx ``mu``, FedBN.
- :func:`build_network`, :func:`model_arrays`, :func:`norm_layer_keys` make the global model,
  its state as numpy arrays, and the normalization-layer keys FedBN keeps at each site.
- :class:`SiteTask` trains one round on a site's data folder and evaluates on its validation
  split; :func:`evaluate_folder` runs a model on a labelled folder (the server's held-out set).

Pipeline: NIfTI -> canonical RAS orientation -> CT window [-1000, 400] HU to [0, 1] (cached
per case: in memory, or on disk in the site's cache folder) -> random patches sampled by label
(half of them centred on a lesion voxel). COPLE-Net trains on 2D axial patches (one slice, a
depth-1 patch) and predicts whole slices; the U-Nets train on 3D patches and predict with a
sliding window.

Example:
    >>> cfg = TrainConfig(model="coplenet", model_features=(8, 16, 32, 64, 128),
    ...                   patch_size=(32, 32), local_steps=2, batch_size=2)
    >>> task = SiteTask("demo/data/site-A", seed=0)
    >>> arrays, metrics = task.train_round(model_arrays(build_network(cfg, seed=0)), cfg)
    >>> sorted(metrics)[:2]
    ['num-examples', 'num-steps']
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmed.data import CacheDataset, PersistentDataset
from fedmed.errors import ConfigError, DataError, ModelError
from fedmed.inference import slicewise_inference, sliding_window_inference
from fedmed.io.msd import load_site_dataset, split_cases
from fedmed.metrics import evaluate_case
from fedmed.nets import build_model
from fedmed.train import LocalTrainer
from fedmed.train import TrainConfig as LocalConfig
from fedmed.transforms.base import Compose
from fedmed.transforms.intensity import ScaleIntensityRanged
from fedmed.transforms.loading import LoadImaged
from fedmed.transforms.spatial import Orientationd

__all__ = [
    "SiteTask",
    "TrainConfig",
    "adapt_norm_statistics",
    "build_network",
    "ensure_app_logging",
    "evaluate_folder",
    "load_arrays",
    "model_arrays",
    "norm_layer_keys",
    "predict_volume",
    "resolve_device",
]

logger = logging.getLogger(__name__)

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_HU_WINDOW = (-1000.0, 400.0)
_POS_FRACTION = 0.5
_PATCHES_PER_CASE_3D = 4


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
            except (TypeError, ValueError) as err:
                raise ConfigError(f"round config {key!r} is invalid: {value!r}") from err
            values[name] = value
        if values.get("patch_size") is None:
            raise ConfigError("round config 'patch-size' is empty")
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
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return build_model(cfg.model, **options)


def norm_layer_keys(model: nn.Module) -> frozenset[str]:
    """state_dict keys of normalization layers (BatchNorm/InstanceNorm/GroupNorm/LayerNorm)."""
    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            for name in module.state_dict():
                keys.add(f"{prefix}.{name}" if prefix else name)
    return frozenset(keys)


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


def _pipeline() -> Compose:
    return Compose(
        [
            LoadImaged(["image", "label"]),
            Orientationd(["image", "label"], "RAS"),
            ScaleIntensityRanged("image", *_HU_WINDOW),
        ]
    )


def _cases_dataset(
    cases: Sequence[dict[str, str]], *, cache_dir: str | Path | None, cache_mode: str
) -> Any:
    if cache_mode == "disk" and cache_dir:
        return PersistentDataset(list(cases), _pipeline(), Path(cache_dir) / "volumes")
    rate = 0.0 if cache_mode == "none" else 1.0
    return CacheDataset(list(cases), _pipeline(), cache_rate=rate, num_workers=1, progress=False)


def _crop(x: torch.Tensor, center: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Crop the trailing ``len(size)`` axes of ``x`` around ``center``, zero-padding as needed."""
    spatial = x.shape[-len(size) :]
    pads: list[int] = []
    index = [slice(None)] * (x.ndim - len(size))
    for c, s, dim in zip(center, size, spatial, strict=True):
        start = min(max(int(c) - s // 2, 0), max(dim - s, 0))
        index.append(slice(start, start + s))
        pads.append(max(s - dim, 0))
    out = x[tuple(index)]
    if any(pads):
        flat = [p for pad in reversed(pads) for p in (0, pad)]
        out = torch.nn.functional.pad(out, flat)
    return out


def _sample(
    item: Mapping[str, Any], cfg: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    image, label = item["image"], item["label"]  # (C, X, Y, Z), (1, X, Y, Z)
    fg = torch.nonzero(label[0] > 0)
    if len(fg) and rng.random() < _POS_FRACTION:
        center = fg[int(rng.integers(len(fg)))].tolist()
    else:
        center = [int(rng.integers(s)) for s in label.shape[1:]]
    if cfg.spatial_dims == 2:
        z = center[2]
        return (
            _crop(image[..., z], center[:2], cfg.patch_size),
            _crop(label[..., z], center[:2], cfg.patch_size),
        )
    return _crop(image, center, cfg.patch_size), _crop(label, center, cfg.patch_size)


class _PatchBatches:
    """Random batches of patches, ``len()`` batches per epoch; ``dataset`` sizes an epoch in
    samples (what LocalTrainer reports as ``num_examples``)."""

    def __init__(
        self, items: Any, cfg: TrainConfig, samples_per_epoch: int, rng: np.random.Generator
    ) -> None:
        self.items, self.cfg, self.rng = items, cfg, rng
        self.dataset = range(samples_per_epoch)

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.dataset) / self.cfg.batch_size))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(len(self)):
            picks = self.rng.integers(len(self.items), size=self.cfg.batch_size)
            batch = [_sample(self.items[int(i)], self.cfg, self.rng) for i in picks]
            yield {
                "image": torch.stack([b[0] for b in batch]),
                "label": torch.stack([b[1] for b in batch]),
            }


def predict_volume(model: nn.Module, image: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Label map (X, Y, Z) for a (C, X, Y, Z) image: COPLE-Net on whole axial slices, the
    U-Nets with a sliding window of the patch size (25 % overlap, Gaussian blending)."""
    model.eval()
    device = next(model.parameters()).device
    batch = image.unsqueeze(0)
    if cfg.spatial_dims == 2:
        x, y = batch.shape[2:4]
        pad_x, pad_y = -x % 16, -y % 16  # COPLE-Net's four poolings need multiples of 16
        padded = torch.nn.functional.pad(batch, (0, 0, 0, pad_y, 0, pad_x))
        probs = slicewise_inference(padded, model, batch_size=8, device=device)[:, :, :x, :y]
    else:
        probs = sliding_window_inference(batch, cfg.patch_size, model, device=device)
    return probs[0].argmax(0)


def _evaluate_items(
    model: nn.Module, items: Sequence[Mapping[str, Any]], cfg: TrainConfig
) -> list[dict[str, Any]]:
    results = []
    for item in items:
        pred = predict_volume(model, item["image"], cfg)
        spacing = item.get("image_meta", {}).get("spacing")
        m = evaluate_case(
            pred.numpy(), item["label"][0].numpy(), num_classes=cfg.out_channels, spacing=spacing
        )
        results.append(
            {
                "case": str(item.get("case_id", len(results))),
                "dice": float(np.nanmean([m[f"dice_{c}"] for c in range(1, cfg.out_channels)])),
                "hd95": float(np.nanmean([m[f"hd95_{c}"] for c in range(1, cfg.out_channels)]))
                if not all(math.isnan(m[f"hd95_{c}"]) for c in range(1, cfg.out_channels))
                else math.nan,
            }
        )
    return results


def _summary(per_case: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    dice = [c["dice"] for c in per_case if not math.isnan(c["dice"])]
    hd = [c["hd95"] for c in per_case if not math.isnan(c["hd95"])]
    return {
        "dice": float(np.mean(dice)) if dice else math.nan,
        "hd95": float(np.mean(hd)) if hd else math.nan,
    }


@torch.no_grad()
def adapt_norm_statistics(
    model: nn.Module, images: Sequence[torch.Tensor], cfg: TrainConfig
) -> None:
    """AdaBN: re-estimate BatchNorm running statistics on unlabelled ``images`` (C, X, Y, Z).

    Under FedBN the global model has no trained normalization statistics (each site keeps its
    own); the server uses this to evaluate it on its held-out images. Only the images are used,
    never the labels; everything but the BatchNorm layers stays in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    device = next(model.parameters()).device
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch below
        m.train()
    try:
        for image in images:
            if cfg.spatial_dims == 2:
                slices = image.permute(3, 0, 1, 2)
                pad_x, pad_y = -slices.shape[2] % 16, -slices.shape[3] % 16
                slices = torch.nn.functional.pad(slices, (0, pad_y, 0, pad_x))
                for first in range(0, slices.shape[0], 8):
                    model(slices[first : first + 8].to(device))
            else:
                rng = np.random.default_rng(0)
                for _ in range(_PATCHES_PER_CASE_3D):
                    center = [int(rng.integers(s)) for s in image.shape[1:]]
                    model(_crop(image, center, cfg.patch_size).unsqueeze(0).to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()


def evaluate_folder(
    weights: Mapping[str, np.ndarray],
    folder: str | Path,
    cfg: TrainConfig,
    *,
    device: str = "auto",
    adapt_norm: bool = False,
) -> dict[str, Any]:
    """Dice and HD95 (mm) of ``weights`` on every labelled case of ``folder``.

    Returns ``{"dice": mean, "hd95": mean, "cases": [{"case", "dice", "hd95"}, ...]}``; the
    means skip NaN (HD95 is NaN when a mask is empty). ``weights`` may lack the normalization
    layers (FedBN); ``adapt_norm`` then re-estimates their statistics on the folder's images
    (:func:`adapt_norm_statistics`) before predicting.
    """
    model = build_network(cfg)
    load_arrays(model, weights, partial=True)
    model.to(resolve_device(device))
    dataset = load_site_dataset(folder)
    items = _cases_dataset(dataset.cases, cache_dir=None, cache_mode="memory")
    cases = [items[i] for i in range(len(items))]
    if adapt_norm:
        adapt_norm_statistics(model, [c["image"] for c in cases], cfg)
    per_case = _evaluate_items(model, cases, cfg)
    return {**_summary(per_case), "cases": per_case}


class SiteTask:
    """One site's data and its local training round.

    Args:
        data_dir: the site's data folder (MSD layout or ``*_img``/``*_seg`` pairs).
        cache_dir: where the disk cache lives (``cache_mode="disk"``).
        cache_mode: ``memory`` (cache volumes in RAM), ``disk`` or ``none``.
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
    ) -> None:
        dataset = load_site_dataset(data_dir)
        train, val = split_cases(dataset.cases, val_fraction=val_fraction, seed=seed)
        if not train:
            raise DataError(f"{data_dir}: no training cases after the validation split")
        self.device = resolve_device(device)
        self.num_train_cases, self.num_val_cases = len(train), len(val)
        self.train = _cases_dataset(train, cache_dir=cache_dir, cache_mode=cache_mode)
        self.val = _cases_dataset(val, cache_dir=cache_dir, cache_mode=cache_mode)

    def samples_per_epoch(self, cfg: TrainConfig) -> int:
        """Training samples in one local epoch (2D: every axial slice; 3D: patches per case)."""
        if cfg.spatial_dims == 3:
            return _PATCHES_PER_CASE_3D * len(self.train)
        return sum(int(self.train[i]["image"].shape[-1]) for i in range(len(self.train)))

    def train_round(
        self,
        global_arrays: Mapping[str, np.ndarray],
        cfg: TrainConfig,
        *,
        local_arrays: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Train from ``global_arrays`` (plus the site's own ``local_arrays``, FedBN) and
        evaluate on the validation split.

        Returns every array of the trained model and scalar metrics: ``num-examples``
        (training samples per epoch), ``num-steps``, ``train-loss``, ``val-dice`` and
        ``val-hd95`` (when the site has validation cases and they are defined),
        ``train-seconds``.
        """
        start = time.perf_counter()
        model = build_network(cfg, seed=cfg.seed)
        if local_arrays:
            load_arrays(model, local_arrays, partial=True)
        load_arrays(model, global_arrays, partial=True)
        rng = np.random.default_rng([cfg.seed, cfg.server_round])
        batches = _PatchBatches(self.train, cfg, self.samples_per_epoch(cfg), rng)
        trainer = LocalTrainer(
            model,
            config=LocalConfig(
                epochs=cfg.local_epochs,
                steps=cfg.local_steps or None,
                lr=cfg.lr,
                proximal_mu=cfg.proximal_mu,
                loss="nr_dice" if cfg.model == "coplenet" else "dice_ce",
            ),
            device=self.device,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**31)))
            # global_weights=None: the FedProx anchor is the model as loaded (global weights,
            # plus the site's own normalization layers under FedBN)
            result = trainer.fit(batches, progress=False)
        metrics: dict[str, float] = {
            "num-examples": float(result.num_examples),
            "num-steps": float(result.steps),
            "train-loss": float(result.loss),
        }
        if len(self.val):
            summary = _summary(
                _evaluate_items(model, [self.val[i] for i in range(len(self.val))], cfg)
            )
            metrics.update({f"val-{k}": v for k, v in summary.items() if math.isfinite(v)})
        metrics["train-seconds"] = time.perf_counter() - start
        return model_arrays(model), metrics
