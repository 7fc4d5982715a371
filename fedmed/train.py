"""A site's local training loop (FedAvg / FedProx), and checkpoints without pickle.

``LocalTrainer.fit`` trains a model on an iterable of ``{"image", "label"}`` batches for a
number of epochs or optimizer steps, with an optional FedProx proximal term
``mu / 2 * ||w - w_global||^2`` over the trainable parameters, gradient clipping, a learning
rate schedule, and mixed precision (autocast + GradScaler) on CUDA only. Each ``fit`` builds a
fresh optimizer: a federated round starts from the global weights, not from the site's
optimizer state of the last round.

``save_checkpoint`` / ``load_checkpoint`` store tensors as safetensors with the JSON metadata
in the safetensors header (one file, written atomically); no pickle is ever read or written.

Example:
    >>> trainer = LocalTrainer(model, config=TrainConfig(epochs=1, lr=1e-3, proximal_mu=0.01))
    >>> result = trainer.fit(loader, global_weights=global_state)
    >>> result.loss, result.num_examples
    >>> save_checkpoint("ckpt.safetensors", model, {"round": 3, "dice": result.val_dice})
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from fedmed.errors import ConfigError, DataError, ModelError
from fedmed.losses import (
    DiceCELoss,
    DiceLoss,
    EMATeacher,
    NoiseRobustDiceLoss,
    SelfEnsemblingLoss,
)

__all__ = [
    "LoadedCheckpoint",
    "LocalTrainer",
    "TrainConfig",
    "TrainResult",
    "build_loss",
    "load_checkpoint",
    "proximal_term",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULES = ("constant", "cosine", "poly")
_LOSSES = ("dice", "dice_ce", "nr_dice")
_METADATA_KEY = "fedmed"


@dataclass(frozen=True)
class TrainConfig:
    """Options of one local training run; invalid values raise ``ConfigError`` at construction.

    ``steps`` (when set) is the exact number of optimizer steps, cycling over the batches as
    often as needed; otherwise training runs ``epochs`` passes. ``lr_schedule`` is applied per
    step: ``cosine`` decays to 0 at the last step, ``poly`` is ``(1 - t/T) ** poly_power``.
    ``amp`` is honoured on CUDA only. ``gamma`` is the noise-robust Dice exponent (``nr_dice``).
    ``self_ensembling`` adds COPLE-Net's adaptive EMA teacher (``ema_alpha``) and the
    consistency term (``consistency_weight``) on top of ``loss="nr_dice"``.

    Example:
        >>> TrainConfig(steps=200, optimizer="sgd", lr=0.01, lr_schedule="poly", proximal_mu=0.01)
    """

    epochs: int = 1
    steps: int | None = None
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    lr_schedule: Literal["constant", "cosine", "poly"] = "constant"
    poly_power: float = 0.9
    grad_clip: float | None = None
    amp: bool = True
    proximal_mu: float = 0.0
    loss: Literal["dice", "dice_ce", "nr_dice"] = "dice_ce"
    gamma: float = 1.5
    self_ensembling: bool = False
    ema_alpha: float = 0.99
    consistency_weight: float = 0.1

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"training setting {name}={getattr(self, name)!r} {rule}")

        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise bad("epochs", "must be an integer >= 1")
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise bad("steps", "must be an integer >= 1, or None to train by epochs")
        if self.optimizer not in _OPTIMIZERS:
            raise bad("optimizer", f"is unknown: use one of {', '.join(_OPTIMIZERS)}")
        if self.lr_schedule not in _SCHEDULES:
            raise bad("lr_schedule", f"is unknown: use one of {', '.join(_SCHEDULES)}")
        if self.loss not in _LOSSES:
            raise bad("loss", f"is unknown: use one of {', '.join(_LOSSES)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "must be a positive number, e.g. 1e-3")
        for name in ("weight_decay", "momentum", "proximal_mu", "consistency_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise bad(name, "must be a number >= 0")
        if not (math.isfinite(self.poly_power) and self.poly_power > 0):
            raise bad("poly_power", "must be a positive number, e.g. 0.9")
        if self.grad_clip is not None and not (
            math.isfinite(self.grad_clip) and self.grad_clip > 0
        ):
            raise bad("grad_clip", "must be a positive max gradient norm, or None for no clipping")
        if not (1.0 <= self.gamma <= 2.0):
            raise bad("gamma", "must be in [1, 2] (1 MAE-like, 2 Dice-like; 1.5 typical)")
        if not 0.0 <= self.ema_alpha < 1.0:
            raise bad("ema_alpha", "must be in [0, 1), e.g. 0.99")
        if self.self_ensembling and self.loss != "nr_dice":
            raise bad("loss", "does not combine with self_ensembling=True: use loss='nr_dice'")


@dataclass(frozen=True)
class TrainResult:
    """What ``fit`` reports: mean task loss over steps (without the proximal term), samples
    in one pass over the data (FedAvg's weight), optimizer steps taken, validation Dice."""

    loss: float
    num_examples: int
    steps: int
    val_dice: float | None


def build_loss(config: TrainConfig) -> nn.Module:
    """The loss module named by ``config.loss``."""
    if config.loss == "dice":
        return DiceLoss()
    if config.loss == "nr_dice":
        return NoiseRobustDiceLoss(gamma=config.gamma)
    return DiceCELoss()


def proximal_term(model: nn.Module, global_weights: Mapping[str, Tensor], mu: float) -> Tensor:
    """FedProx's ``mu / 2 * sum ||w - w_global||^2`` over the trainable parameters of ``model``."""
    total: Tensor | None = None
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name not in global_weights:
            raise ModelError(
                f"global weights lack parameter {name!r}: the server model and the site "
                "model differ; use the same architecture on both sides"
            )
        anchor = global_weights[name].to(device=param.device, dtype=param.dtype)
        if anchor.shape != param.shape:
            raise ModelError(
                f"global weight {name!r} has shape {tuple(anchor.shape)} but the model has "
                f"{tuple(param.shape)}: use the same architecture on both sides"
            )
        sq = (param - anchor).pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        return torch.zeros(())
    return 0.5 * mu * total


class LocalTrainer:
    """Trains ``model`` on a site's batches; ``device=None`` picks CUDA when available.

    Example:
        >>> trainer = LocalTrainer(model, config=TrainConfig(steps=100), device="cuda")
        >>> trainer.fit(batches, val_fn=lambda m: validate(m)).val_dice
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        config: TrainConfig,
        device: torch.device | str | None = None,
    ) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.config = config
        self.loss_fn = build_loss(config).to(self.device)
        self.use_amp = config.amp and self.device.type == "cuda"
        self.teacher: EMATeacher | None = None

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ModelError("the model has no trainable parameters: nothing to train")
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _lr_factor(self, step: int, total: int) -> float:
        cfg = self.config
        t = min(step / max(total, 1), 1.0)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if cfg.lr_schedule == "poly":
            return (1.0 - t) ** cfg.poly_power
        return 1.0

    def _total_steps(self, batches: Iterable[Mapping[str, Tensor]]) -> int | None:
        if self.config.steps is not None:
            return self.config.steps
        try:
            return self.config.epochs * len(batches)  # type: ignore[arg-type]
        except TypeError:
            if self.config.lr_schedule != "constant":
                raise ConfigError(
                    f"lr_schedule={self.config.lr_schedule!r} needs the number of steps, but "
                    "the batches have no len(): set steps, or use lr_schedule='constant'"
                ) from None
            return None

    def _passes(
        self, batches: Iterable[Mapping[str, Tensor]]
    ) -> Iterable[tuple[int, Mapping[str, Tensor]]]:
        """Yield ``(pass, batch)`` for the configured epochs, or cycling until ``steps``."""
        limit = self.config.steps
        yielded = 0
        for index in range(self.config.epochs if limit is None else sys.maxsize):
            before = yielded
            for batch in batches:
                yield index, batch
                yielded += 1
                if yielded == limit:
                    return
            if yielded == before:
                if index:  # an empty first pass is reported by fit()
                    logger.warning(
                        "training batches ran out after %d steps in pass %d (a one-shot "
                        "iterator?): pass a DataLoader or list to train for %s",
                        yielded,
                        index + 1,
                        f"{limit} steps" if limit else f"{self.config.epochs} epochs",
                    )
                return

    def _to_device(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        for key in ("image", "label"):
            if key not in batch:
                raise DataError(
                    f"training batch has no {key!r} entry (keys: {sorted(batch)}): batches "
                    "must be dicts with 'image' and 'label' tensors"
                )
        non_blocking = self.device.type == "cuda"
        image = batch["image"].to(self.device, non_blocking=non_blocking)
        label = batch["label"].to(self.device, non_blocking=non_blocking)
        return image, label

    def fit(
        self,
        train_batches: Iterable[Mapping[str, Tensor]],
        *,
        val_fn: Callable[[nn.Module], float] | None = None,
        global_weights: Mapping[str, Tensor] | None = None,
        progress: bool = True,
    ) -> TrainResult:
        """Train, then validate with ``val_fn(model)`` if given.

        ``global_weights`` anchors the FedProx term; when it is None and ``proximal_mu > 0``
        the model's weights at the start of ``fit`` (the global model just loaded) are used.
        ``num_examples`` counts the samples of the first pass over ``train_batches``.
        With ``self_ensembling`` a new EMA teacher starts from the weights at the start of
        ``fit`` and is left in ``self.teacher``; ``self.model`` (the student) is the result.
        """
        cfg = self.config
        model = self.model
        anchor: dict[str, Tensor] | None = None
        if cfg.proximal_mu > 0:
            source = global_weights if global_weights is not None else model.state_dict()
            anchor = {
                k: torch.as_tensor(v).detach().to(self.device).clone() for k, v in source.items()
            }
        elif global_weights is not None:
            logger.warning("global_weights given but proximal_mu is 0: training is plain FedAvg")
        optimizer = self._optimizer()
        total = self._total_steps(train_batches)
        scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        first_pass_size = self._first_pass_size(train_batches)
        ensembling: SelfEnsemblingLoss | None = None
        if cfg.self_ensembling:
            self.teacher = EMATeacher(model, alpha=cfg.ema_alpha)
            ensembling = SelfEnsemblingLoss(
                gamma=cfg.gamma, consistency_weight=cfg.consistency_weight
            )

        model.train()
        losses: list[float] = []
        examples = 0
        bar = tqdm(self._passes(train_batches), total=total, desc="train", disable=not progress)
        for step, (pass_index, batch) in enumerate(bar):
            image, label = self._to_device(batch)
            if total is not None:
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * self._lr_factor(step, total)
            with torch.autocast(device_type=self.device.type, enabled=self.use_amp):
                logits = model(image)
                if ensembling is not None and self.teacher is not None:
                    parts = ensembling(logits, self.teacher(image), label)
                    loss, objective = parts.supervised, parts.loss
                else:
                    loss = objective = self.loss_fn(logits, label)
            if not torch.isfinite(loss):
                raise ModelError(
                    f"training loss became {float(loss.detach())} at step {step}: lower lr "
                    f"(now {cfg.lr}) or set grad_clip"
                )
            objective = objective.float()
            if anchor is not None:
                objective = objective + proximal_term(model, anchor, cfg.proximal_mu)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(objective).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            if self.teacher is not None:
                self.teacher.update(model, losses[-1])
            if pass_index == 0:
                examples += int(image.shape[0])
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        if not losses:
            raise DataError("the training batches are empty: the site has no training data")

        val_dice = None
        if val_fn is not None:
            model.eval()
            val_dice = float(val_fn(model))
        num_examples = first_pass_size if first_pass_size is not None else examples
        return TrainResult(
            loss=sum(losses) / len(losses),
            num_examples=num_examples,
            steps=len(losses),
            val_dice=val_dice,
        )

    @staticmethod
    def _first_pass_size(batches: Iterable[Mapping[str, Tensor]]) -> int | None:
        """Samples per pass, known up front for a DataLoader over a sized dataset or a list."""
        dataset = getattr(batches, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__"):
            return len(dataset)
        if isinstance(batches, (list, tuple)):
            return sum(int(b["image"].shape[0]) for b in batches if "image" in b)
        return None


class LoadedCheckpoint(NamedTuple):
    """A checkpoint's tensors (on CPU) and its JSON metadata."""

    state_dict: dict[str, Tensor]
    metadata: dict[str, Any]


def save_checkpoint(
    path: str | Path,
    model: nn.Module | Mapping[str, Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s state_dict (or a state_dict) and JSON ``metadata`` as safetensors.

    The file is written to a temporary name and renamed, so a crash never leaves half a
    checkpoint. ``metadata`` must be JSON-serialisable.
    """
    path = Path(path)
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    try:
        meta_json = json.dumps(dict(metadata or {}), sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise ModelError(
            f"checkpoint metadata for {path} is not JSON-serialisable ({err}): "
            "use numbers, strings, lists and dicts"
        ) from err
    # clone(): safetensors refuses tensors sharing storage (tied weights, views).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_METADATA_KEY: meta_json})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint written by ``save_checkpoint``; ``ModelError`` names a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist: check the path")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(
            f"checkpoint {path} is not a readable safetensors file ({err}): "
            "re-save it with fedmed, or restore it from a backup"
        ) from err
    if _METADATA_KEY not in header:
        raise ModelError(f"checkpoint {path} has no fedmed metadata: save it with save_checkpoint")
    try:
        metadata = json.loads(header[_METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ModelError(f"checkpoint {path} has corrupt metadata JSON: {err}") from err
    return LoadedCheckpoint(state, metadata)
