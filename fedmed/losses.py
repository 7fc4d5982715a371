"""Segmentation losses: Dice, Dice + cross-entropy, COPLE-Net's noise-robust Dice.

Every loss takes raw network outputs (logits) of shape ``(B, C, *spatial)`` with ``C >= 2``
classes and 2 or 3 spatial dims, applies a softmax over the channels, and takes the target as
either integer class labels of shape ``(B, 1, *spatial)`` or ``(B, *spatial)``, or a one-hot /
soft target of the same shape as the logits.

``DiceLoss`` and ``DiceCELoss`` follow MONAI's formulas and defaults for ``softmax=True,
to_onehot_y=True`` (``smooth_nr = smooth_dr = 1e-5``, one Dice per sample and class unless
``batch=True``) so numbers are comparable with MONAI-trained models.

``NoiseRobustDiceLoss`` is COPLE-Net's loss (Wang et al., IEEE TMI 2020) in two forms::

    linear  (reference code): L = mean_c sum_i |p_ic - g_ic|^gamma / (sum_i (p_ic + g_ic) + eps)
    squared (the paper):      L = mean_c sum_i |p_ic - g_ic|^gamma / (sum_i (p_ic² + g_ic²) + eps)

with ``i`` running over every pixel of the batch, as the reference implementation does.
``gamma`` in [1, 2]: 1.5 is the paper's choice; lower is more robust to noisy labels. Only the
squared form is Dice-like at ``gamma = 2``: since ``sum |p - g|^2 = sum p^2 + sum g^2 - 2 sum pg``,
it equals ``1 - 2 sum(pg) / (sum p^2 + sum g^2)``, the soft Dice loss with a squared
denominator (up to ``eps``). At ``gamma = 1`` with binary ``g`` the linear form is
``sum |p - g| / (sum p + sum g)``, an MAE normalised by the foreground size.

:func:`build_loss` makes one from its run-setting names (``loss``, ``nr-gamma``,
``nr-denominator``). COPLE-Net's adaptive self-ensembling, which adds an EMA teacher to the
noise-robust Dice, is :mod:`fedmed.ensembling`.

Example:
    >>> loss_fn = NoiseRobustDiceLoss(gamma=1.5)
    >>> loss = loss_fn(model(images), labels)  # labels (B, 1, H, W) integer
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmed.errors import ConfigError

__all__ = [
    "LOSSES",
    "NR_DENOMINATORS",
    "DiceCELoss",
    "DiceLoss",
    "NoiseRobustDiceLoss",
    "build_loss",
    "one_hot_target",
]

LOSSES: tuple[str, ...] = ("dice", "dice-ce", "nr-dice")
NR_DENOMINATORS: tuple[str, ...] = ("linear", "squared")


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
            f"noise-robust Dice gamma must be in [1, 2] (1.5 is the paper's), got {gamma!r}"
        )
    return float(gamma)


class NoiseRobustDiceLoss(nn.Module):
    """COPLE-Net's noise-robust Dice loss, ``mean_c sum|p-g|^gamma / (denominator + eps)``.

    ``denominator="linear"`` is the reference code's ``sum(p + g)``; ``"squared"`` the paper's
    ``sum(p^2 + g^2)``, which at ``gamma = 2`` is the squared soft Dice loss (module doc).
    Sums run over every pixel of the batch (the reference flattens ``(B, *spatial)``);
    ``batch=False`` computes one value per sample and class instead and averages them.

    Example:
        >>> NoiseRobustDiceLoss(gamma=1.5, denominator="squared")(logits, labels)
    """

    def __init__(
        self,
        *,
        gamma: float = 1.5,
        denominator: Literal["linear", "squared"] = "linear",
        eps: float = 1e-5,
        include_background: bool = True,
        batch: bool = True,
    ) -> None:
        super().__init__()
        self.gamma = _check_gamma(gamma)
        if denominator not in NR_DENOMINATORS:
            raise ValueError(
                f"noise-robust Dice denominator must be 'linear' (reference code) or "
                f"'squared' (paper), got {denominator!r}"
            )
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.denominator = denominator
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
        if self.denominator == "squared":
            denominator = (probs.square() + ground.square()).sum(dims)
        else:
            denominator = (probs + ground).sum(dims)
        return numerator / (denominator + self.eps)


def build_loss(
    name: str, *, nr_gamma: float = 1.5, nr_denominator: str = "linear"
) -> NoiseRobustDiceLoss | DiceLoss | DiceCELoss:
    """The loss named by the run settings ``loss``, ``nr-gamma`` and ``nr-denominator``.

    ``name`` is ``dice``, ``dice-ce`` or ``nr-dice`` (``dice_ce``/``nr_dice`` are accepted);
    ``nr_gamma`` and ``nr_denominator`` apply to ``nr-dice`` only. Raises ``ConfigError``
    naming the setting for an unknown name, a gamma outside [1, 2] or an unknown denominator.

    Example:
        >>> build_loss("nr-dice", nr_gamma=2.0, nr_denominator="squared")  # the squared Dice
    """
    kind = str(name).strip().lower().replace("_", "-")
    if kind not in LOSSES:
        raise ConfigError(f"loss = {name!r} is unknown: use {', '.join(LOSSES)}")
    if kind == "dice":
        return DiceLoss()
    if kind == "dice-ce":
        return DiceCELoss()
    if nr_denominator not in NR_DENOMINATORS:
        raise ConfigError(
            f"nr-denominator = {nr_denominator!r} is unknown: use linear (the COPLE-Net "
            "reference code) or squared (the paper)"
        )
    try:
        gamma = _check_gamma(nr_gamma)
    except ValueError:
        raise ConfigError(
            f"nr-gamma = {nr_gamma!r} must be a number in [1, 2] (1.5 is the paper's)"
        ) from None
    return NoiseRobustDiceLoss(gamma=gamma, denominator=nr_denominator)  # type: ignore[arg-type]
