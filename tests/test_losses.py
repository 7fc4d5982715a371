"""Losses against MONAI and hand-written numpy references; EMA teacher and self-ensembling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss as MonaiDiceCELoss
from monai.losses import DiceLoss as MonaiDiceLoss
from torch import nn

from fedmed.losses import (
    DiceCELoss,
    DiceLoss,
    EMATeacher,
    NoiseRobustDiceLoss,
    SelfEnsemblingLoss,
    one_hot_target,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SHAPES = {"2d": (2, 3, 6, 5), "3d": (2, 2, 4, 5, 3)}


def _case(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=gen)
    return logits, labels


def _softmax_np(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _onehot_np(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.stack([(labels[:, 0] == c) for c in range(num_classes)], axis=1).astype(float)


@pytest.mark.parametrize("dims", SHAPES, ids=str)
@pytest.mark.parametrize("include_background", [True, False], ids=["bg", "nobg"])
@pytest.mark.parametrize("batch", [False, True], ids=["per-sample", "batch"])
def test_dice_loss_matches_monai(dims: str, include_background: bool, batch: bool) -> None:
    logits, labels = _case(SHAPES[dims])
    ours = DiceLoss(include_background=include_background, batch=batch)(logits, labels)
    ref = MonaiDiceLoss(
        include_background=include_background, to_onehot_y=True, softmax=True, batch=batch
    )(logits, labels)
    torch.testing.assert_close(ours, ref)


def test_dice_loss_matches_hand_computed_numpy() -> None:
    logits, labels = _case(SHAPES["2d"], seed=3)
    p = _softmax_np(logits.numpy())
    g = _onehot_np(labels.numpy(), 3)
    inter = (p * g).sum(axis=(2, 3))
    denom = p.sum(axis=(2, 3)) + g.sum(axis=(2, 3))
    expected = np.mean(1 - (2 * inter + 1e-5) / (denom + 1e-5))
    assert DiceLoss()(logits, labels).item() == pytest.approx(expected, rel=1e-12)


def test_label_layouts_give_the_same_loss() -> None:
    logits, labels = _case(SHAPES["3d"])
    onehot = one_hot_target(labels, logits)
    loss = DiceLoss()
    reference = loss(logits, labels)
    torch.testing.assert_close(loss(logits, labels[:, 0]), reference)
    torch.testing.assert_close(loss(logits, onehot), reference)
    torch.testing.assert_close(loss(logits, labels.float()), reference)


@pytest.mark.parametrize("dims", SHAPES, ids=str)
@pytest.mark.parametrize("include_background", [True, False], ids=["bg", "nobg"])
def test_dice_ce_loss_matches_monai(dims: str, include_background: bool) -> None:
    logits, labels = _case(SHAPES[dims], seed=1)
    kwargs = {"include_background": include_background, "lambda_dice": 0.7, "lambda_ce": 1.3}
    ours = DiceCELoss(**kwargs)(logits, labels)
    ref = MonaiDiceCELoss(to_onehot_y=True, softmax=True, **kwargs)(logits, labels)
    torch.testing.assert_close(ours, ref)


def test_dice_ce_class_weights_apply_to_cross_entropy_only() -> None:
    logits, labels = _case(SHAPES["2d"], seed=2)
    weight = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    p = _softmax_np(logits.numpy())
    lab = labels.numpy()[:, 0]
    picked = np.take_along_axis(p, lab[:, None], axis=1)[:, 0]
    w = weight.numpy()[lab]
    ce = -(w * np.log(picked)).sum() / w.sum()
    dice = DiceLoss()(logits, labels).item()
    ours = DiceCELoss(ce_weight=weight, lambda_ce=0.5)(logits, labels).item()
    assert ours == pytest.approx(dice + 0.5 * ce, rel=1e-10)


def _nr_dice_reference(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> float:
    """The COPLE-Net reference: flatten (B, *spatial) to rows, sum per class, mean."""
    num_classes = logits.shape[1]
    p = np.moveaxis(_softmax_np(logits.numpy()), 1, -1).reshape(-1, num_classes)
    g = np.moveaxis(_onehot_np(labels.numpy(), num_classes), 1, -1).reshape(-1, num_classes)
    ratio = (np.abs(p - g) ** gamma).sum(axis=0) / ((p + g).sum(axis=0) + 1e-5)
    return float(ratio.mean())


@pytest.mark.parametrize("dims", SHAPES, ids=str)
@pytest.mark.parametrize("gamma", [1.0, 1.5, 2.0])
def test_noise_robust_dice_matches_reference_formula(dims: str, gamma: float) -> None:
    logits, labels = _case(SHAPES[dims], seed=4)
    ours = NoiseRobustDiceLoss(gamma=gamma)(logits, labels).item()
    assert ours == pytest.approx(_nr_dice_reference(logits, labels, gamma), rel=1e-12)


def test_noise_robust_dice_gamma_2_by_hand_on_two_pixels() -> None:
    # Two pixels, two classes; softmax of (0, ln 3) is (1/4, 3/4).
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(3.0), 0.0]]]], dtype=torch.float64)
    labels = torch.tensor([[[[1, 0]]]])
    # class 0: p = (1/4, 1/2), g = (0, 1): num = 1/16 + 1/4, den = 1/4 + 3/2
    # class 1: p = (3/4, 1/2), g = (1, 0): num = 1/16 + 1/4, den = 7/4 + 1/2
    c0 = (1 / 16 + 1 / 4) / (7 / 4 + 1e-5)
    c1 = (1 / 16 + 1 / 4) / (9 / 4 + 1e-5)
    loss = NoiseRobustDiceLoss(gamma=2.0)(logits, labels).item()
    assert loss == pytest.approx((c0 + c1) / 2, rel=1e-12)


def test_noise_robust_dice_per_sample_mode_averages_samples() -> None:
    logits, labels = _case(SHAPES["2d"], seed=5)
    per_sample = NoiseRobustDiceLoss(batch=False)(logits, labels).item()
    expected = np.mean(
        [_nr_dice_reference(logits[i : i + 1], labels[i : i + 1], 1.5) for i in (0, 1)]
    )
    assert per_sample == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("gamma", [0.5, 2.5, float("nan"), True], ids=str)
def test_noise_robust_dice_rejects_gamma_outside_1_2(gamma: float) -> None:
    with pytest.raises(ValueError, match=r"gamma must be in \[1, 2\]"):
        NoiseRobustDiceLoss(gamma=gamma)


def test_labels_out_of_range_are_rejected() -> None:
    logits, labels = _case(SHAPES["2d"])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\]"):
        DiceLoss()(logits, labels + 1)


def test_single_channel_logits_are_rejected() -> None:
    with pytest.raises(ValueError, match="need >= 2"):
        NoiseRobustDiceLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.long))


@pytest.mark.parametrize(
    "loss_fn",
    [DiceLoss(), DiceLoss(include_background=False), DiceCELoss(), NoiseRobustDiceLoss()],
    ids=["dice", "dice-nobg", "dice-ce", "nr-dice"],
)
@pytest.mark.parametrize("empty", [False, True], ids=["labels", "all-background"])
def test_gradients_are_finite(loss_fn: nn.Module, empty: bool) -> None:
    logits, labels = _case(SHAPES["3d"], seed=6)
    logits = (logits * 20).float().requires_grad_(True)  # saturated softmax
    if empty:
        labels = torch.zeros_like(labels)
    loss = loss_fn(logits, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


# --- EMA teacher -------------------------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2))


def _perturb(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(value)
        model[1].running_mean.add_(value)
        model[1].num_batches_tracked.add_(5)


def test_ema_update_is_exact_and_copies_integer_buffers() -> None:
    # Prepare
    student = _net()
    teacher = EMATeacher(student, alpha=0.9)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    _perturb(student, 1.0)
    # Execute
    applied = teacher.update(student, 0.5)
    # Assert
    assert applied
    after = teacher.model.state_dict()
    for key, old in before.items():
        new_student = student.state_dict()[key]
        if old.is_floating_point():
            torch.testing.assert_close(after[key], 0.9 * old + 0.1 * new_student)
        else:
            assert torch.equal(after[key], new_student)
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_ema_update_skipped_when_loss_above_running_average() -> None:
    student = _net()
    teacher = EMATeacher(student, alpha=0.5, loss_momentum=0.9)
    assert teacher.update(student, 1.0)  # first update always applies
    assert teacher.running_loss == pytest.approx(1.0)
    frozen = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    _perturb(student, 2.0)

    assert not teacher.update(student, 1.5)  # above average 1.0: skipped

    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    assert teacher.running_loss == pytest.approx(0.9 * 1.0 + 0.1 * 1.5)
    assert (teacher.num_updates, teacher.num_skipped) == (1, 1)


def test_ema_update_applied_when_loss_below_running_average() -> None:
    student = _net()
    teacher = EMATeacher(student, alpha=0.5, loss_momentum=0.9)
    teacher.update(student, 1.0)
    weight_before = teacher.model[0].weight.clone()
    _perturb(student, 2.0)

    assert teacher.update(student, 0.8)

    torch.testing.assert_close(
        teacher.model[0].weight, 0.5 * weight_before + 0.5 * student[0].weight
    )
    assert teacher.running_loss == pytest.approx(0.9 * 1.0 + 0.1 * 0.8)


def test_ema_non_adaptive_always_updates_and_non_finite_loss_skips() -> None:
    student = _net()
    teacher = EMATeacher(student, adaptive=False)
    assert teacher.update(student, 1.0)
    assert teacher.update(student, 100.0)
    assert not teacher.update(student, float("nan"))
    assert teacher.running_loss == pytest.approx(0.9 * 1.0 + 0.1 * 100.0)


@pytest.mark.parametrize("alpha", [-0.1, 1.0], ids=str)
def test_ema_rejects_alpha_outside_0_1(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
        EMATeacher(_net(), alpha=alpha)


# --- self-ensembling loss ----------------------------------------------------------------


def test_teacher_equal_to_student_gives_no_consistency() -> None:
    logits, labels = _case(SHAPES["2d"], seed=7)
    out = SelfEnsemblingLoss(granularity="pixel")(logits, logits.clone(), labels)
    assert out.teacher_better == 0.0
    assert out.consistency.item() == 0.0
    torch.testing.assert_close(out.loss, NoiseRobustDiceLoss()(logits, labels))


@pytest.mark.parametrize("dims", SHAPES, ids=str)
def test_sample_mask_selects_samples_where_teacher_loss_is_lower(dims: str) -> None:
    # Prepare: the teacher is near-perfect on sample 0 and bad on sample 1.
    logits, labels = _case(SHAPES[dims], seed=8)
    onehot = one_hot_target(labels, logits)
    teacher = logits.clone()
    teacher[0] = 10.0 * (2 * onehot[0] - 1)
    teacher[1] = -10.0 * (2 * onehot[1] - 1)
    criterion = SelfEnsemblingLoss(granularity="sample", consistency_weight=0.5)
    # Execute
    mask = criterion.teacher_better_mask(logits, teacher, labels)
    out = criterion(logits, teacher, labels)
    # Assert
    assert mask.shape == (2, 1, *SHAPES[dims][2:])
    assert mask[0].all() and not mask[1].any()
    diff = (torch.softmax(logits[0], 0) - torch.softmax(teacher[0], 0)).pow(2).mean(0)
    torch.testing.assert_close(out.consistency, diff.mean())
    torch.testing.assert_close(out.loss, out.supervised + 0.5 * out.consistency)
    assert out.teacher_better == pytest.approx(0.5)


def test_pixel_mask_compares_per_pixel_errors() -> None:
    labels = torch.tensor([[[[0, 1, 1]]]])
    student = torch.tensor([[[[2.0, 2.0, -2.0]], [[-2.0, -2.0, 2.0]]]])  # right, wrong, right
    teacher = torch.tensor([[[[1.0, -3.0, 3.0]], [[-1.0, 3.0, -3.0]]]])  # less sure, right, wrong
    mask = SelfEnsemblingLoss(granularity="pixel").teacher_better_mask(student, teacher, labels)
    assert mask.tolist() == [[[[False, True, False]]]]


def test_self_ensembling_gradient_reaches_student_only() -> None:
    logits, labels = _case(SHAPES["3d"], seed=9)
    student = logits.float().requires_grad_(True)
    teacher = (logits.float() * 3).requires_grad_(True)
    SelfEnsemblingLoss(granularity="pixel")(student, teacher, labels).loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert teacher.grad is None


def test_self_ensembling_rejects_unknown_granularity() -> None:
    with pytest.raises(ValueError, match="granularity must be 'sample' or 'pixel'"):
        SelfEnsemblingLoss(granularity="voxel")  # type: ignore[arg-type]


def test_public_api_is_pinned() -> None:
    import fedmed.losses as module

    assert sorted(module.__all__) == [
        "DiceCELoss",
        "DiceLoss",
        "EMATeacher",
        "NoiseRobustDiceLoss",
        "SelfEnsemblingLoss",
        "SelfEnsemblingOutput",
        "one_hot_target",
    ]
    assert all(hasattr(module, name) for name in module.__all__)
