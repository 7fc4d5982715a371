"""COPLE-Net's adaptive self-ensembling: an EMA teacher that learns only from low-loss steps.

Wang et al. (IEEE TMI 2020) train a student with the noise-robust Dice loss
(:class:`~fedmed.losses.NoiseRobustDiceLoss`) and keep a teacher, the exponential moving
average of the student's weights, made adaptive twice over:

- the teacher (:class:`EMATeacher`) folds the student in,
  ``teacher = alpha * teacher + (1 - alpha) * student`` (``alpha``: the decay, 0.99), only
  after a step whose loss is below the loss threshold: the running (exponential) mean of the
  student's past losses. A high loss flags a batch with noisy labels that the teacher should
  not absorb;
- the student (:class:`SelfEnsemblingLoss`) learns from the teacher, through a consistency
  term, only where the teacher's loss against the label is lower than its own.

:class:`~fedmed.train.LocalTrainer` runs both with ``TrainerConfig(self_ensembling=True)``.

Example:
    >>> teacher = EMATeacher(model, alpha=0.99)
    >>> criterion = SelfEnsemblingLoss(gamma=1.5, consistency_weight=0.1)
    >>> out = criterion(model(x), teacher(x), labels)
    >>> out.loss.backward(); optimizer.step()
    >>> teacher.update(model, out.supervised)
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from fedmed.losses import NoiseRobustDiceLoss, one_hot_target

__all__ = ["EMATeacher", "SelfEnsemblingLoss", "SelfEnsemblingOutput"]

logger = logging.getLogger(__name__)


class EMATeacher:
    """An exponential-moving-average copy of a student network, updated adaptively.

    After each optimizer step call ``update(student, loss)``. The teacher's weights become
    ``alpha * teacher + (1 - alpha) * student`` (floating-point parameters and buffers; integer
    buffers such as BatchNorm's ``num_batches_tracked`` are copied), but with ``adaptive=True``
    only when the student's loss is below the running average of its past losses: a high loss
    signals a batch with noisy labels the teacher should not absorb (COPLE-Net's adaptive
    teacher). The running average is an exponential one (``loss_momentum``) over every loss
    seen, taken before the current loss is added; the first call always updates.

    Example:
        >>> teacher = EMATeacher(model, alpha=0.99)
        >>> applied = teacher.update(model, loss.item())
        >>> soft_targets = teacher(images)
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        alpha: float = 0.99,
        loss_momentum: float = 0.9,
        adaptive: bool = True,
    ) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"EMA alpha must be in [0, 1), got {alpha}")
        if not 0.0 <= loss_momentum < 1.0:
            raise ValueError(f"loss_momentum must be in [0, 1), got {loss_momentum}")
        self.alpha = alpha
        self.loss_momentum = loss_momentum
        self.adaptive = adaptive
        self.model = copy.deepcopy(student).requires_grad_(False).eval()
        self.running_loss: float | None = None
        self.num_updates = 0
        self.num_skipped = 0

    def __call__(self, inputs: Tensor) -> Tensor:
        """The teacher's prediction (no gradient)."""
        with torch.no_grad():
            return self.model(inputs)

    def update(self, student: nn.Module, loss: float | Tensor) -> bool:
        """Fold ``student`` into the teacher unless its ``loss`` is high; return whether it did."""
        value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        if not math.isfinite(value):
            logger.warning("EMA teacher: student loss is %s, teacher update skipped", value)
            self.num_skipped += 1
            return False
        apply = not self.adaptive or self.running_loss is None or value < self.running_loss
        if apply:
            self._ema_from(student)
            self.num_updates += 1
        else:
            self.num_skipped += 1
        if self.running_loss is None:
            self.running_loss = value
        else:
            m = self.loss_momentum
            self.running_loss = m * self.running_loss + (1.0 - m) * value
        return apply

    @torch.no_grad()
    def _ema_from(self, student: nn.Module) -> None:
        teacher_state = self.model.state_dict()
        student_state = student.state_dict()
        if teacher_state.keys() != student_state.keys():
            raise ValueError("EMA teacher and student have different state_dict keys")
        for key, t in teacher_state.items():
            s = student_state[key].to(t.device)
            if t.is_floating_point():
                t.mul_(self.alpha).add_(s.to(t.dtype), alpha=1.0 - self.alpha)
            else:
                t.copy_(s)


class SelfEnsemblingOutput(NamedTuple):
    """Total loss and its parts; ``teacher_better`` is the fraction of the mask that is on."""

    loss: Tensor
    supervised: Tensor
    consistency: Tensor
    teacher_better: float


class SelfEnsemblingLoss(nn.Module):
    """Noise-robust Dice on the (noisy) labels plus a consistency term toward the teacher.

    The student learns from the teacher only where the teacher is better: a mask is on where
    the teacher's noise-robust loss against the label is lower than the student's, per sample
    (``granularity="sample"``, the whole-image loss) or per pixel (``"pixel"``, the pixel's
    ``sum_c |p - g|^gamma``). The consistency term is the mean squared difference between the
    student's and the teacher's softmax probabilities over the masked pixels (zero if none).

    Example:
        >>> criterion = SelfEnsemblingLoss(gamma=1.5, consistency_weight=0.1)
        >>> out = criterion(model(x), teacher(x), labels)
        >>> out.loss.backward()
    """

    def __init__(
        self,
        *,
        gamma: float = 1.5,
        denominator: Literal["linear", "squared"] = "linear",
        consistency_weight: float = 0.1,
        granularity: Literal["sample", "pixel"] = "sample",
    ) -> None:
        super().__init__()
        if granularity not in ("sample", "pixel"):
            raise ValueError(f"granularity must be 'sample' or 'pixel', got {granularity!r}")
        if consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {consistency_weight}")
        self.supervised = NoiseRobustDiceLoss(gamma=gamma, denominator=denominator)
        self.consistency_weight = consistency_weight
        self.granularity = granularity

    def teacher_better_mask(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor
    ) -> Tensor:
        """Boolean ``(B, 1, *spatial)`` mask where the teacher's loss is below the student's."""
        with torch.no_grad():
            if self.granularity == "sample":
                student = self.supervised.per_sample(student_logits, target)
                teacher = self.supervised.per_sample(teacher_logits, target)
                better = teacher < student
                shape = (-1,) + (1,) * (student_logits.ndim - 1)
                return better.view(shape).expand(-1, 1, *student_logits.shape[2:])
            ground = one_hot_target(target, student_logits)
            gamma = self.supervised.gamma
            student = (torch.softmax(student_logits, 1) - ground).abs().pow(gamma).sum(1)
            teacher = (torch.softmax(teacher_logits, 1) - ground).abs().pow(gamma).sum(1)
            return (teacher < student).unsqueeze(1)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor
    ) -> SelfEnsemblingOutput:
        """Return the total loss and its parts; the teacher's logits get no gradient."""
        teacher_logits = teacher_logits.detach()
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} differ from student "
                f"logits {tuple(student_logits.shape)}"
            )
        supervised = self.supervised(student_logits, target)
        mask = self.teacher_better_mask(student_logits, teacher_logits, target).to(
            student_logits.dtype
        )
        squared = (torch.softmax(student_logits, 1) - torch.softmax(teacher_logits, 1)).pow(2)
        per_pixel = squared.mean(dim=1, keepdim=True)
        consistency = (per_pixel * mask).sum() / mask.sum().clamp(min=1.0)
        total = supervised + self.consistency_weight * consistency
        return SelfEnsemblingOutput(total, supervised, consistency, float(mask.mean()))
