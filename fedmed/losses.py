"""Segmentation losses: Dice, Dice + cross-entropy, COPLE-Net's noise-robust Dice, self-ensembling.

Every loss takes raw network outputs (logits) of shape ``(B, C, *spatial)`` with ``C >= 2``
classes and 2 or 3 spatial dims, applies a softmax over the channels, and takes the target as
either integer class labels of shape ``(B, 1, *spatial)`` or ``(B, *spatial)``, or a one-hot /
soft target of the same shape as the logits.

``DiceLoss`` and ``DiceCELoss`` follow MONAI's formulas and defaults for ``softmax=True,
to_onehot_y=True`` (``smooth_nr = smooth_dr = 1e-5``, one Dice per sample and class unless
``batch=True``) so numbers are comparable with MONAI-trained models.

``NoiseRobustDiceLoss`` is COPLE-Net's loss (Wang et al., IEEE TMI 2020)::

    L = mean_c  sum_i |p_ic - g_ic| ** gamma  /  (sum_i (p_ic + g_ic) + eps)

with ``i`` running over every pixel of the batch, as the reference implementation does.
``gamma = 2`` gives a Dice-like loss, ``gamma = 1`` an MAE-like one that is more robust to
noisy labels; 1.5 is the paper's choice.

The adaptive self-ensembling option is ``EMATeacher`` (an EMA teacher that skips updates
when the student's loss is high) plus ``SelfEnsemblingLoss`` (the supervised loss plus a
consistency term toward the teacher where the teacher is better).

Example:
    >>> loss_fn = NoiseRobustDiceLoss(gamma=1.5)
    >>> loss = loss_fn(model(images), labels)  # labels (B, 1, H, W) integer
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DiceCELoss",
    "DiceLoss",
    "EMATeacher",
    "NoiseRobustDiceLoss",
    "SelfEnsemblingLoss",
    "SelfEnsemblingOutput",
    "one_hot_target",
]

logger = logging.getLogger(__name__)


def one_hot_target(target: Tensor, logits: Tensor) -> Tensor:
    """Return ``target`` as a float one-hot (or soft) tensor shaped like ``logits``.

    ``target`` is integer labels ``(B, 1, *spatial)`` / ``(B, *spatial)``, or already one-hot
    or soft with the shape of ``logits``.
    """
    if logits.ndim not in (4, 5):
        raise ValueError(
            f"logits must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(logits.shape)}"
        )
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(
            f"logits have {num_classes} channel; softmax losses need >= 2 (background + classes)"
        )
    if target.shape == logits.shape:  # labels (B, 1, ...) never match: C >= 2
        return target.to(logits.dtype)
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}: "
            "give labels as (B, 1, *spatial) or (B, *spatial), or one-hot like the logits"
        )
    labels = target.long() if target.is_floating_point() else target.to(torch.long)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"target labels span [{int(labels.min())}, {int(labels.max())}] but logits have "
            f"{num_classes} classes: labels must be in [0, {num_classes - 1}]"
        )
    return F.one_hot(labels, num_classes).movedim(-1, 1).to(logits.dtype)


def _class_index_target(target: Tensor, logits: Tensor) -> Tensor:
    """Integer class indices ``(B, *spatial)`` for cross-entropy, or soft targets like logits."""
    if target.shape == logits.shape and target.is_floating_point():
        return target.to(logits.dtype)  # soft targets: cross_entropy takes probabilities
    return one_hot_target(target, logits).argmax(dim=1)


class DiceLoss(nn.Module):
    """Soft Dice loss on softmax outputs (MONAI: ``DiceLoss(softmax=True, to_onehot_y=True)``).

    ``1 - (2 * sum(p * g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr)`` per sample and class
    (or per class over the whole batch when ``batch=True``), averaged.

    Example:
        >>> DiceLoss(include_background=False)(logits, labels)
    """

    def __init__(
        self,
        *,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
    ) -> None:
        super().__init__()
        if smooth_nr < 0 or smooth_dr < 0:
            raise ValueError(f"smooth terms must be >= 0, got {smooth_nr=}, {smooth_dr=}")
        self.include_background = include_background
        self.smooth_nr = smooth_nr
        self.smooth_dr = smooth_dr
        self.batch = batch

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean Dice loss; ``logits`` ``(B, C, *spatial)``, ``target`` labels or one-hot."""
        ground = one_hot_target(target, logits)
        probs = torch.softmax(logits, dim=1)
        if not self.include_background:
            probs, ground = probs[:, 1:], ground[:, 1:]
        dims = [0, *range(2, logits.ndim)] if self.batch else list(range(2, logits.ndim))
        intersection = (probs * ground).sum(dims)
        denominator = probs.sum(dims) + ground.sum(dims)
        dice = (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)
        return (1.0 - dice).mean()


class DiceCELoss(nn.Module):
    """``lambda_dice * DiceLoss + lambda_ce * cross-entropy`` (MONAI's ``DiceCELoss``).

    Cross-entropy always covers every class (also when ``include_background=False``, as in
    MONAI). ``ce_weight`` gives optional per-class cross-entropy weights; unlike MONAI's
    ``weight`` it does not also rescale the Dice terms.

    Example:
        >>> DiceCELoss(lambda_dice=1.0, lambda_ce=0.5)(logits, labels)
    """

    def __init__(
        self,
        *,
        include_background: bool = True,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        ce_weight: Tensor | None = None,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
    ) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0:
            raise ValueError(f"loss weights must be >= 0, got {lambda_dice=}, {lambda_ce=}")
        self.dice = DiceLoss(
            include_background=include_background,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
        )
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.register_buffer("ce_weight", None if ce_weight is None else torch.as_tensor(ce_weight))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Weighted sum of Dice loss and mean cross-entropy."""
        ce_target = _class_index_target(target, logits)
        weight = None if self.ce_weight is None else self.ce_weight.to(logits.dtype)
        ce = F.cross_entropy(logits, ce_target, weight=weight)
        return self.lambda_dice * self.dice(logits, target) + self.lambda_ce * ce


def _check_gamma(gamma: float) -> float:
    if isinstance(gamma, bool) or not (isinstance(gamma, (int, float)) and 1.0 <= gamma <= 2.0):
        raise ValueError(
            f"noise-robust Dice gamma must be in [1, 2] (1 MAE-like, 2 Dice-like), got {gamma!r}"
        )
    return float(gamma)


class NoiseRobustDiceLoss(nn.Module):
    """COPLE-Net's noise-robust Dice loss, ``mean_c sum|p-g|^gamma / (sum(p+g) + eps)``.

    Sums run over every pixel of the batch (the reference flattens ``(B, *spatial)``);
    ``batch=False`` computes one value per sample and class instead and averages them.

    Example:
        >>> NoiseRobustDiceLoss(gamma=1.5)(logits, labels)
    """

    def __init__(
        self,
        *,
        gamma: float = 1.5,
        eps: float = 1e-5,
        include_background: bool = True,
        batch: bool = True,
    ) -> None:
        super().__init__()
        self.gamma = _check_gamma(gamma)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = eps
        self.include_background = include_background
        self.batch = batch

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of each sample, shape ``(B,)`` (sums over that sample's pixels)."""
        probs, ground = self._probs_and_ground(logits, target)
        dims = list(range(2, logits.ndim))
        ratio = self._ratio(probs, ground, dims)
        return ratio.mean(dim=1)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Scalar loss; ``logits`` ``(B, C, *spatial)``, ``target`` labels or one-hot/soft."""
        if not self.batch:
            return self.per_sample(logits, target).mean()
        probs, ground = self._probs_and_ground(logits, target)
        dims = [0, *range(2, logits.ndim)]
        return self._ratio(probs, ground, dims).mean()

    def _probs_and_ground(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        ground = one_hot_target(target, logits)
        probs = torch.softmax(logits, dim=1)
        if not self.include_background:
            probs, ground = probs[:, 1:], ground[:, 1:]
        return probs, ground

    def _ratio(self, probs: Tensor, ground: Tensor, dims: list[int]) -> Tensor:
        numerator = (probs - ground).abs().pow(self.gamma).sum(dims)
        denominator = (probs + ground).sum(dims)
        return numerator / (denominator + self.eps)


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
        consistency_weight: float = 0.1,
        granularity: Literal["sample", "pixel"] = "sample",
    ) -> None:
        super().__init__()
        if granularity not in ("sample", "pixel"):
            raise ValueError(f"granularity must be 'sample' or 'pixel', got {granularity!r}")
        if consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {consistency_weight}")
        self.supervised = NoiseRobustDiceLoss(gamma=gamma)
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
