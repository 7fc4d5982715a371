"""A site's local training loop (FedAvg / FedProx, optional COPLE-Net self-ensembling).

``LocalTrainer.fit`` trains a model on an iterable of ``{"image", "label"}`` batches for a
number of epochs or optimizer steps, with an optional FedProx proximal term
(:mod:`fedmed.fedprox`), gradient clipping, a learning
rate schedule, and optional COPLE-Net self-ensembling. Each ``fit`` builds a fresh optimizer:
a federated round starts from the global weights, not from the site's optimizer state of the
last round.

What changes the numerics is :class:`TrainerConfig` (the run settings); how the site's hardware
runs it is :class:`~fedmed.hardware.HardwareSettings` (devices, a LAMP model split over a
device list, mixed precision fp16/bf16, channels-last, ``torch.compile``). A partitioned model
keeps its placement: inputs go to the first stage's device, targets and the loss to the output
device, and the FedProx anchor of each parameter to that parameter's device.

Checkpoints are :mod:`fedmed.checkpoint`.

Example:
    >>> trainer = LocalTrainer(model, config=TrainerConfig(epochs=1, lr=1e-3, proximal_mu=0.01),
    ...                        hardware=HardwareSettings(devices="cuda:0,cuda:1"))
    >>> result = trainer.fit(loader, global_weights=global_state)
    >>> result.loss, result.num_examples
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fedmed.devices import input_device, output_device
from fedmed.ensembling import EMATeacher, SelfEnsemblingLoss
from fedmed.errors import ConfigError, DataError, ModelError
from fedmed.fedprox import proximal_anchor, proximal_term
from fedmed.hardware import HardwareSettings
from fedmed.losses import NR_DENOMINATORS, build_loss

__all__ = ["LocalTrainer", "TrainResult", "TrainerConfig"]

logger = logging.getLogger(__name__)

_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULES = ("constant", "cosine", "poly")
_LOSSES = ("dice", "dice_ce", "nr_dice")


@dataclass(frozen=True)
class TrainerConfig:
    """Options of one local training run; invalid values raise ``ConfigError`` at construction.

    ``steps`` (when set) is the exact number of optimizer steps, cycling over the batches as
    often as needed; otherwise training runs ``epochs`` passes. ``lr_schedule`` is applied per
    step: ``cosine`` decays to 0 at the last step, ``poly`` is ``(1 - t/T) ** poly_power``.

    Loss: ``loss`` is ``dice``, ``dice_ce`` or ``nr_dice`` (the run settings' spellings
    ``dice-ce`` and ``nr-dice`` are accepted and stored with underscores). ``gamma`` and
    ``nr_denominator`` shape the noise-robust Dice (``linear``: the reference code's
    ``sum(p + g)``; ``squared``: the paper's ``sum(p^2 + g^2)``, Dice-like at gamma 2).

    ``self_ensembling`` (with ``loss="nr_dice"``) adds COPLE-Net's adaptive self-ensembling
    (:mod:`fedmed.ensembling`): an EMA teacher of decay ``ema_alpha`` that takes in only the
    steps whose loss is below the loss threshold, the running mean of past losses (momentum
    ``ema_loss_momentum``), and a consistency term toward it weighted ``consistency_weight``.

    Example:
        >>> TrainerConfig(steps=200, optimizer="sgd", lr=0.01, lr_schedule="poly", proximal_mu=0.01)
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
    proximal_mu: float = 0.0
    loss: Literal["dice", "dice_ce", "nr_dice"] = "dice_ce"
    gamma: float = 1.5
    nr_denominator: Literal["linear", "squared"] = "linear"
    self_ensembling: bool = False
    ema_alpha: float = 0.99
    ema_loss_momentum: float = 0.9
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
        if isinstance(self.loss, str):
            object.__setattr__(self, "loss", self.loss.replace("-", "_"))
        if self.loss not in _LOSSES:
            raise bad("loss", "is unknown: use dice, dice-ce or nr-dice")
        if self.nr_denominator not in NR_DENOMINATORS:
            raise bad("nr_denominator", "is unknown: use linear (reference code) or squared")
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
            raise bad("gamma", "must be in [1, 2] (1.5 is the paper's; lower = more robust)")
        for name in ("ema_alpha", "ema_loss_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise bad(name, "must be in [0, 1), e.g. 0.99")
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


class LocalTrainer:
    """Trains ``model`` on a site's batches, placed and run as ``hardware`` says.

    Args:
        model: the network; a ``LAMPUNet`` is split over ``hardware.devices``.
        config: the run's training settings.
        hardware: the site's :class:`~fedmed.hardware.HardwareSettings`.
        device: shorthand for ``HardwareSettings(devices=device)`` (``"cuda"``,
            ``"cpu,cpu"`` ...); give ``device`` or ``hardware``, not both. With neither, a
            LAMP model already split over devices keeps its placement, and anything else goes
            to CUDA when available, else the CPU.
        sample_shape: the input ``(1, C, *patch)`` LAMP's partitioner profiles.

    ``self.model`` is the network (never a ``torch.compile`` wrapper: its state_dict keys are
    the model's own); with ``self_ensembling`` the last ``fit``'s teacher is ``self.teacher``.

    Example:
        >>> trainer = LocalTrainer(model, config=TrainerConfig(steps=100), device="cuda:0,cuda:1")
        >>> trainer.fit(batches, val_fn=lambda m: validate(m)).val_dice
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        config: TrainerConfig,
        hardware: HardwareSettings | None = None,
        device: torch.device | str | None = None,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        if hardware is not None and device is not None:
            raise ConfigError(
                f"LocalTrainer got device={str(device)!r} and hardware settings: give one "
                "(the device list is hardware.devices)"
            )
        kept = None
        if hardware is None and device is None:
            kept = HardwareSettings.of_split_model(model)  # a LAMP model split beforehand
        if kept is not None:
            hardware = kept
        else:
            hardware = hardware or HardwareSettings(devices="auto" if device is None else device)
            model = hardware.prepare(model, sample_shape=sample_shape)
        self.model = model
        self.hardware = hardware
        self.config = config
        self.device = input_device(model)
        self.output_device = output_device(model)
        self.loss_fn = build_loss(
            config.loss, nr_gamma=config.gamma, nr_denominator=config.nr_denominator
        ).to(self.output_device)
        self.amp_dtype = hardware.amp_dtype
        self.use_amp = self.amp_dtype is not None
        self._forward = hardware.compiled(model)  # self.model keeps its own state_dict keys
        self.ensembling = (
            SelfEnsemblingLoss(
                gamma=config.gamma,
                denominator=config.nr_denominator,
                consistency_weight=config.consistency_weight,
            )
            if config.self_ensembling
            else None
        )
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
        # The image enters the first stage; the label meets the output on the last one.
        image = batch["image"].to(self.device, non_blocking=self.device.type == "cuda")
        label = batch["label"].to(
            self.output_device, non_blocking=self.output_device.type == "cuda"
        )
        return self.hardware.format_input(image), label

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
        With ``self_ensembling`` an EMA teacher starts from the weights at the start of
        ``fit`` (a round's global model) and is left in ``self.teacher``; the result is the
        student, ``self.model``: the teacher never leaves the site.
        """
        cfg = self.config
        model = self.model
        anchor: dict[str, Tensor] | None = None
        if cfg.proximal_mu > 0:
            anchor = proximal_anchor(model, global_weights)
        elif global_weights is not None:
            logger.warning("global_weights given but proximal_mu is 0: training is plain FedAvg")
        optimizer = self._optimizer()
        total = self._total_steps(train_batches)
        scaler = torch.amp.GradScaler("cuda", enabled=self.hardware.uses_grad_scaler)
        first_pass_size = self._first_pass_size(train_batches)
        self.teacher = None
        if self.ensembling is not None:
            self.teacher = EMATeacher(
                model, alpha=cfg.ema_alpha, loss_momentum=cfg.ema_loss_momentum
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
            with self.hardware.autocast():
                logits = self._forward(image)
                teacher_logits = self.teacher(image) if self.teacher is not None else None
            # The loss in float32: softmax and sums over a volume lose too much in 16 bits.
            logits = logits.float()
            if self.ensembling is not None and teacher_logits is not None:
                parts = self.ensembling(logits, teacher_logits.float(), label)
                loss, objective = parts.supervised, parts.loss
            else:
                loss = objective = self.loss_fn(logits, label)
            if not torch.isfinite(loss):
                raise ModelError(
                    f"training loss became {float(loss.detach())} at step {step}: lower lr "
                    f"(now {cfg.lr}) or set grad_clip"
                )
            if anchor is not None:
                objective = objective + proximal_term(
                    model, anchor, cfg.proximal_mu, device=objective.device
                )
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
