"""Losses against MONAI and hand-written numpy references; EMA teacher and self-ensembling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss as MonaiDiceCELoss
from monai.losses import DiceLoss as MonaiDiceLoss
from torch import nn

from fedmed.errors import ConfigError
from fedmed.losses import (
    DiceCELoss,
    DiceLoss,
    NoiseRobustDiceLoss,
    build_loss,
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


def _rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and one-hot labels as (pixels of the whole batch, classes)."""
    num_classes = logits.shape[1]
    p = np.moveaxis(_softmax_np(logits.numpy()), 1, -1).reshape(-1, num_classes)
    g = np.moveaxis(_onehot_np(labels.numpy(), num_classes), 1, -1).reshape(-1, num_classes)
    return p, g


def _nr_dice_reference(
    logits: torch.Tensor, labels: torch.Tensor, gamma: float, *, squared: bool = False
) -> float:
    """The COPLE-Net reference: flatten (B, *spatial) to rows, sum per class, mean;
    ``squared`` puts the paper's sum(p^2 + g^2) in the denominator."""
    p, g = _rows(logits, labels)
    denominator = (p**2 + g**2).sum(axis=0) if squared else (p + g).sum(axis=0)
    ratio = (np.abs(p - g) ** gamma).sum(axis=0) / (denominator + 1e-5)
    return float(ratio.mean())


@pytest.mark.parametrize("dims", SHAPES, ids=str)
@pytest.mark.parametrize("gamma", [1.0, 1.5, 2.0])
def test_noise_robust_dice_matches_reference_formula(dims: str, gamma: float) -> None:
    logits, labels = _case(SHAPES[dims], seed=4)
    ours = NoiseRobustDiceLoss(gamma=gamma)(logits, labels).item()
    assert ours == pytest.approx(_nr_dice_reference(logits, labels, gamma), rel=1e-12)


@pytest.mark.parametrize("dims", SHAPES, ids=str)
@pytest.mark.parametrize("gamma", [1.0, 1.5, 2.0])
def test_noise_robust_dice_squared_denominator_matches_the_papers_formula(
    dims: str, gamma: float
) -> None:
    logits, labels = _case(SHAPES[dims], seed=6)
    ours = NoiseRobustDiceLoss(gamma=gamma, denominator="squared")(logits, labels).item()
    expected = _nr_dice_reference(logits, labels, gamma, squared=True)
    assert ours == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("soft", [False, True], ids=["binary-target", "soft-target"])
def test_squared_noise_robust_dice_at_gamma_2_is_the_squared_soft_dice(soft: bool) -> None:
    # sum|p-g|^2 = sum p^2 + sum g^2 - 2 sum pg, so NR = 1 - 2 sum(pg) / (sum p^2 + sum g^2)
    # per class; the identity holds for any p, g (eps aside), binary labels included.
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=gen)
    if soft:
        target = torch.softmax(torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=gen), 1)
    else:
        target = one_hot_target(torch.randint(0, 3, (2, 1, 7, 6), generator=gen), logits)
    loss = NoiseRobustDiceLoss(gamma=2.0, denominator="squared", eps=1e-12)
    p = torch.softmax(logits, 1).movedim(1, -1).reshape(-1, 3).numpy()
    g = target.movedim(1, -1).reshape(-1, 3).numpy()

    squared_dice = 1.0 - 2.0 * (p * g).sum(0) / ((p**2).sum(0) + (g**2).sum(0))

    assert loss(logits, target).item() == pytest.approx(float(squared_dice.mean()), rel=1e-10)
    # The reference code's linear denominator is not Dice-like at gamma 2.
    linear = NoiseRobustDiceLoss(gamma=2.0, denominator="linear")(logits, target).item()
    assert abs(linear - float(squared_dice.mean())) > 1e-3


def test_noise_robust_dice_rejects_an_unknown_denominator() -> None:
    with pytest.raises(ValueError, match=r"denominator must be 'linear' .* or 'squared'"):
        NoiseRobustDiceLoss(denominator="cubic")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("dice", DiceLoss),
        ("dice-ce", DiceCELoss),
        ("dice_ce", DiceCELoss),
        ("nr-dice", NoiseRobustDiceLoss),
    ],
    ids=str,
)
def test_build_loss_takes_the_run_setting_names(name: str, kind: type) -> None:
    assert type(build_loss(name)) is kind


def test_build_loss_passes_gamma_and_denominator_to_nr_dice() -> None:
    loss = build_loss("nr-dice", nr_gamma=2.0, nr_denominator="squared")
    assert isinstance(loss, NoiseRobustDiceLoss)
    assert (loss.gamma, loss.denominator) == (2.0, "squared")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"name": "focal"}, "loss = 'focal' is unknown: use dice, dice-ce, nr-dice"),
        ({"name": "nr-dice", "nr_gamma": 2.5}, r"nr-gamma = 2.5 must be a number in \[1, 2\]"),
        ({"name": "nr-dice", "nr_denominator": "cubic"}, "nr-denominator = 'cubic' is unknown"),
    ],
    ids=["loss", "gamma", "denominator"],
)
def test_build_loss_errors_name_the_setting(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_loss(**options)


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


def test_public_api_is_pinned() -> None:
    import fedmed.losses as module

    assert sorted(module.__all__) == [
        "DiceCELoss",
        "DiceLoss",
        "LOSSES",
        "NR_DENOMINATORS",
        "NoiseRobustDiceLoss",
        "build_loss",
        "one_hot_target",
    ]
    assert all(hasattr(module, name) for name in module.__all__)
