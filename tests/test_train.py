"""Local training: convergence, FedProx, schedules, clipping, AMP, self-ensembling, LAMP splits."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from fedmed.errors import ConfigError, DataError, ModelError
from fedmed.fedprox import proximal_term
from fedmed.hardware import HardwareSettings
from fedmed.losses import NoiseRobustDiceLoss
from fedmed.nets import LAMPUNet
from fedmed.train import LocalTrainer, TrainerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 2, 1),
    )


def _batches(num: int = 4, batch_size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Bright discs on noise; the label is the disc."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    out = []
    for _ in range(num):
        centres = torch.randint(4, 12, (batch_size, 2), generator=gen).float()
        dist = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2
        label = (dist < 9).long()[:, None]
        image = label.float() + 0.3 * torch.randn(label.shape, generator=gen)
        out.append({"image": image, "label": label})
    return out


def _mean_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]], loss_fn) -> float:
    model.eval()
    with torch.no_grad():
        return sum(float(loss_fn(model(b["image"]), b["label"])) for b in batches) / len(batches)


@pytest.mark.parametrize("loss", ["dice", "dice_ce", "nr_dice"])
def test_loss_goes_down_on_a_tiny_problem(loss: str) -> None:
    # Prepare
    model, batches = _tiny_net(), _batches()
    config = TrainerConfig(steps=20, lr=0.05, loss=loss)
    trainer = LocalTrainer(model, config=config, device="cpu")
    before = _mean_loss(model, batches, trainer.loss_fn)
    # Execute
    result = trainer.fit(batches, progress=False)
    # Assert
    after = _mean_loss(model, batches, trainer.loss_fn)
    assert after < 0.6 * before, (before, after)
    assert result.steps == 20
    assert result.num_examples == 16
    assert math.isfinite(result.loss)


def test_one_shot_iterator_stops_early_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    trainer = LocalTrainer(_tiny_net(), config=TrainerConfig(steps=5), device="cpu")
    with caplog.at_level(logging.WARNING, logger="fedmed.train"):
        result = trainer.fit(iter(_batches(num=2, batch_size=2)), progress=False)
    assert (result.steps, result.num_examples) == (2, 4)
    assert "ran out after 2 steps in pass 2" in caplog.text
    assert "to train for 5 steps" in caplog.text


def test_epochs_count_steps_and_examples_and_val_fn_is_called() -> None:
    batches = _batches(num=3, batch_size=2)
    seen: list[bool] = []

    def val_fn(model: nn.Module) -> float:
        seen.append(model.training)
        return 0.75

    trainer = LocalTrainer(_tiny_net(), config=TrainerConfig(epochs=2), device="cpu")
    result = trainer.fit(batches, val_fn=val_fn, progress=False)
    assert (result.steps, result.num_examples, result.val_dice) == (6, 6, 0.75)
    assert seen == [False]  # validated once, in eval mode


def test_steps_cycle_over_a_generator_source_and_count_one_pass() -> None:
    class Reiterable:
        def __iter__(self):
            yield from _batches(num=3, batch_size=2)

    trainer = LocalTrainer(_tiny_net(), config=TrainerConfig(steps=7), device="cpu")
    result = trainer.fit(Reiterable(), progress=False)
    assert (result.steps, result.num_examples) == (7, 6)


def test_fedprox_keeps_weights_closer_to_the_global_model() -> None:
    batches = _batches()
    global_weights = {k: v.clone() for k, v in _tiny_net().state_dict().items()}

    def drift(mu: float) -> float:
        model = _tiny_net()
        config = TrainerConfig(steps=10, lr=0.05, proximal_mu=mu)
        LocalTrainer(model, config=config, device="cpu").fit(
            batches, global_weights=global_weights, progress=False
        )
        with torch.no_grad():
            return float(proximal_term(model, global_weights, 2.0))

    assert drift(mu=5.0) < 0.5 * drift(mu=0.0)


def test_gradient_clipping_bounds_each_sgd_update() -> None:
    model = _tiny_net()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    config = TrainerConfig(steps=1, optimizer="sgd", lr=1.0, momentum=0.0, grad_clip=0.01)
    LocalTrainer(model, config=config, device="cpu").fit(_batches(num=1), progress=False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize(
    ("schedule", "factor_at_half"),
    [("constant", 1.0), ("cosine", 0.5), ("poly", 0.5**0.9)],
)
def test_lr_schedules(schedule: str, factor_at_half: float) -> None:
    trainer = LocalTrainer(
        _tiny_net(), config=TrainerConfig(lr_schedule=schedule, steps=10), device="cpu"
    )
    assert trainer._lr_factor(0, 10) == pytest.approx(1.0)
    assert trainer._lr_factor(5, 10) == pytest.approx(factor_at_half)


def test_amp_auto_is_off_on_cpu_and_equals_amp_off() -> None:
    results = []
    for amp in ("auto", "off"):
        model = _tiny_net()
        hardware = HardwareSettings(devices="cpu", amp=amp)
        trainer = LocalTrainer(model, config=TrainerConfig(steps=3), hardware=hardware)
        assert not trainer.use_amp
        trainer.fit(_batches(num=3), progress=False)
        results.append(model.state_dict())
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]), key


def test_bf16_on_cpu_trains_with_float32_weights_and_loss() -> None:
    # Prepare
    model, batches = _tiny_net(), _batches()
    hardware = HardwareSettings(devices="cpu", amp="bf16")
    trainer = LocalTrainer(model, config=TrainerConfig(steps=20, lr=0.05), hardware=hardware)
    before = _mean_loss(model, batches, trainer.loss_fn)
    # Execute
    result = trainer.fit(batches, progress=False)
    # Assert
    assert trainer.amp_dtype == torch.bfloat16
    assert _mean_loss(model, batches, trainer.loss_fn) < 0.6 * before
    assert math.isfinite(result.loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_channels_last_training_matches_the_default_layout() -> None:
    results = []
    for channels_last in (False, True):
        model = _tiny_net()
        hardware = HardwareSettings(devices="cpu", channels_last=channels_last)
        # SGD: Adam would blow up the rounding noise of the bias ahead of batch norm
        config = TrainerConfig(steps=3, lr=0.05, optimizer="sgd")
        trainer = LocalTrainer(model, config=config, hardware=hardware)
        result = trainer.fit(_batches(num=3), progress=False)
        results.append((result.loss, model.state_dict()))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for key, value in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_device_and_hardware_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="give one"):
        LocalTrainer(
            _tiny_net(), config=TrainerConfig(), device="cpu", hardware=HardwareSettings("cpu")
        )


def test_a_device_list_for_a_model_that_cannot_be_split_is_refused() -> None:
    with pytest.raises(ConfigError, match="device lists 2 devices but Sequential cannot be split"):
        LocalTrainer(_tiny_net(), config=TrainerConfig(), device="cpu,cpu")


def test_self_ensembling_trains_student_and_keeps_an_ema_teacher() -> None:
    # Prepare
    model = _tiny_net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainerConfig(
        steps=6, lr=0.05, loss="nr-dice", nr_denominator="squared", self_ensembling=True,
        ema_alpha=0.5, ema_loss_momentum=0.5,
    )  # fmt: skip
    trainer = LocalTrainer(model, config=config, device="cpu")
    # Execute
    result = trainer.fit(_batches(num=3), progress=False)
    # Assert
    teacher = trainer.teacher
    assert teacher is not None and result.steps == 6
    assert teacher.loss_momentum == 0.5
    assert list(model.state_dict()) == list(start)  # the teacher adds nothing to the model
    assert teacher.num_updates >= 1 and teacher.num_updates + teacher.num_skipped == 6
    weight = "0.weight"
    t, s, s0 = teacher.model.state_dict()[weight], model.state_dict()[weight], start[weight]
    assert not torch.equal(t, s) and not torch.equal(t, s0)
    assert (t - s).norm() < (s0 - s).norm()  # the teacher follows the student


def test_diverging_training_raises_model_error() -> None:
    batches = _batches(num=1)
    batches[0]["image"][0, 0, 0, 0] = float("nan")
    trainer = LocalTrainer(_tiny_net(), config=TrainerConfig(steps=1), device="cpu")
    with pytest.raises(ModelError, match="training loss became nan at step 0: lower lr"):
        trainer.fit(batches, progress=False)


def test_batches_without_label_or_data_raise_data_error() -> None:
    trainer = LocalTrainer(_tiny_net(), config=TrainerConfig(steps=1), device="cpu")
    with pytest.raises(DataError, match="training batch has no 'label' entry"):
        trainer.fit([{"image": torch.zeros(1, 1, 8, 8)}], progress=False)
    with pytest.raises(DataError, match="the training batches are empty"):
        trainer.fit([], progress=False)


def test_schedule_without_known_length_needs_steps() -> None:
    config = TrainerConfig(lr_schedule="cosine")
    trainer = LocalTrainer(_tiny_net(), config=config, device="cpu")
    with pytest.raises(ConfigError, match="set steps"):
        trainer.fit(iter(_batches(num=1)), progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs=0 must be an integer >= 1"),
        ({"steps": 0}, "steps=0 must be an integer >= 1"),
        ({"optimizer": "rmsprop"}, "optimizer='rmsprop' is unknown: use one of adam"),
        ({"lr": 0.0}, "lr=0.0 must be a positive number"),
        ({"weight_decay": -1.0}, "weight_decay=-1.0 must be a number >= 0"),
        ({"lr_schedule": "step"}, "lr_schedule='step' is unknown"),
        ({"grad_clip": 0.0}, "grad_clip=0.0 must be a positive max gradient norm"),
        ({"proximal_mu": float("nan")}, "proximal_mu=nan must be a number >= 0"),
        ({"loss": "focal"}, "loss='focal' is unknown: use dice, dice-ce or nr-dice"),
        ({"gamma": 2.5}, r"gamma=2.5 must be in \[1, 2\]"),
        ({"nr_denominator": "cubic"}, "nr_denominator='cubic' is unknown: use linear"),
        ({"ema_alpha": 1.0}, r"ema_alpha=1.0 must be in \[0, 1\)"),
        ({"ema_loss_momentum": -0.1}, r"ema_loss_momentum=-0.1 must be in \[0, 1\)"),
        (
            {"self_ensembling": True},
            "does not combine with self_ensembling=True: use loss='nr_dice'",
        ),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_invalid_config_raises_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainerConfig(**kwargs)


def test_the_trainer_builds_the_loss_with_gamma_and_denominator() -> None:
    config = TrainerConfig(loss="nr_dice", gamma=1.2, nr_denominator="squared")
    loss = LocalTrainer(_tiny_net(), config=config, device="cpu").loss_fn
    assert isinstance(loss, NoiseRobustDiceLoss)
    assert (loss.gamma, loss.denominator) == (1.2, "squared")


def test_run_setting_spellings_of_the_loss_are_accepted() -> None:
    assert TrainerConfig(loss="dice-ce").loss == "dice_ce"
    assert TrainerConfig(loss="nr-dice").loss == "nr_dice"


def test_public_api_is_pinned() -> None:
    import fedmed.train as module

    assert sorted(module.__all__) == ["LocalTrainer", "TrainResult", "TrainerConfig"]
    assert all(hasattr(module, name) for name in module.__all__)


# --- a LAMP model split over a device list --------------------------------------------------


def _lamp_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    label = (torch.rand(4, 1, 16, 16, 16, generator=gen) > 0.7).long()
    return [
        {"image": label.float() + 0.3 * torch.randn(label.shape, generator=gen), "label": label}
    ]


def _lamp_pair(**config: object) -> tuple[LocalTrainer, LocalTrainer]:
    torch.manual_seed(0)
    reference = LAMPUNet(features=(4, 8, 16), chunks=1, checkpoint=False)
    split = LAMPUNet(features=(4, 8, 16))
    split.load_state_dict(reference.state_dict())
    cfg = TrainerConfig(steps=1, optimizer="sgd", lr=0.1, **config)  # type: ignore[arg-type]
    hardware = HardwareSettings(devices="cpu,cpu", lamp_micro_batches=2)
    return (
        LocalTrainer(reference, config=cfg, device="cpu"),
        LocalTrainer(split, config=cfg, hardware=hardware, sample_shape=(1, 1, 16, 16, 16)),
    )


@pytest.mark.parametrize(
    "config",
    [{}, {"proximal_mu": 0.1}, {"loss": "nr-dice", "self_ensembling": True}],
    ids=["dice-ce", "fedprox", "self-ensembling"],
)
def test_a_step_on_a_split_lamp_model_equals_the_unpartitioned_step(config: dict) -> None:
    # Prepare
    reference, split = _lamp_pair(**config)
    batches = _lamp_batches()

    # Execute
    expected = reference.fit(batches, progress=False)
    result = split.fit(batches, progress=False)

    # Assert: same loss, same gradients, same weights after the step; still split
    assert len(split.model.placement.sizes) == 2 and split.model.chunks == 2
    assert result.loss == pytest.approx(expected.loss, rel=1e-5)
    ref_params = dict(reference.model.named_parameters())
    for name, p in split.model.named_parameters():
        assert p.grad is not None, f"No gradient for {name}"
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(p, ref_params[name], atol=1e-6, rtol=1e-5, msg=name)
    assert list(split.model.state_dict()) == list(reference.model.state_dict())


def test_a_model_split_beforehand_keeps_its_placement() -> None:
    net = LAMPUNet(features=(4, 8, 16), devices=["cpu", "cpu"], balance=(2, 4), chunks=3)
    trainer = LocalTrainer(net, config=TrainerConfig(steps=1))
    assert trainer.model.placement.sizes == (2, 4)
    assert trainer.hardware.lamp_micro_batches == 3
    trainer.fit(_lamp_batches(), progress=False)
    assert trainer.model.placement.sizes == (2, 4)


@pytest.mark.slow
def test_compile_wraps_the_forward_only_so_state_dict_keys_are_the_models() -> None:
    model = _tiny_net()
    keys = list(model.state_dict())
    trainer = LocalTrainer(
        model, config=TrainerConfig(), hardware=HardwareSettings(devices="cpu", compile=True)
    )
    assert trainer.model is model and list(trainer.model.state_dict()) == keys
    assert trainer._forward is not model and not any("_orig_mod" in k for k in keys)
