"""Self-ensembling: the EMA teacher's loss threshold, the consistency toward a better teacher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmed.ensembling import EMATeacher, SelfEnsemblingLoss
from fedmed.losses import NoiseRobustDiceLoss, one_hot_target

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = {"2d": (2, 3, 6, 5), "3d": (2, 2, 4, 5, 3)}


def _case(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=gen)
    return logits, labels


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


def test_self_ensembling_supervised_term_uses_the_denominator() -> None:
    logits, labels = _case(SHAPES["2d"], seed=8)
    out = SelfEnsemblingLoss(gamma=1.5, denominator="squared")(logits, logits * 2, labels)
    expected = NoiseRobustDiceLoss(gamma=1.5, denominator="squared")(logits, labels)
    assert out.supervised.item() == pytest.approx(expected.item(), rel=1e-12)


def test_public_api_is_pinned() -> None:
    import fedmed.ensembling as module

    assert sorted(module.__all__) == ["EMATeacher", "SelfEnsemblingLoss", "SelfEnsemblingOutput"]
    assert all(hasattr(module, name) for name in module.__all__)
