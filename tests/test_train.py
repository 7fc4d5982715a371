"""Local training: convergence, FedProx term, schedules, clipping, checkpoints without pickle."""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from fedmed.errors import ConfigError, DataError, ModelError
from fedmed.train import (
    LocalTrainer,
    TrainConfig,
    build_loss,
    load_checkpoint,
    proximal_term,
    save_checkpoint,
)

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
    config = TrainConfig(steps=20, lr=0.05, loss=loss)
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
    trainer = LocalTrainer(_tiny_net(), config=TrainConfig(steps=5), device="cpu")
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

    trainer = LocalTrainer(_tiny_net(), config=TrainConfig(epochs=2), device="cpu")
    result = trainer.fit(batches, val_fn=val_fn, progress=False)
    assert (result.steps, result.num_examples, result.val_dice) == (6, 6, 0.75)
    assert seen == [False]  # validated once, in eval mode


def test_steps_cycle_over_a_generator_source_and_count_one_pass() -> None:
    class Reiterable:
        def __iter__(self):
            yield from _batches(num=3, batch_size=2)

    trainer = LocalTrainer(_tiny_net(), config=TrainConfig(steps=7), device="cpu")
    result = trainer.fit(Reiterable(), progress=False)
    assert (result.steps, result.num_examples) == (7, 6)


def test_proximal_term_matches_formula_and_is_zero_at_global_weights() -> None:
    model = _tiny_net()
    global_weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert proximal_term(model, global_weights, 0.3).item() == 0.0

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    with torch.no_grad():
        squares = [((p - global_weights[n]) ** 2).sum() for n, p in model.named_parameters()]
    expected = 0.5 * 0.3 * float(sum(squares))
    term = proximal_term(model, global_weights, 0.3)
    assert term.item() == pytest.approx(expected, rel=1e-6)
    term.backward()
    weight = model[0].weight
    torch.testing.assert_close(weight.grad, 0.3 * (weight - global_weights["0.weight"]))


def test_proximal_term_skips_frozen_parameters_and_rejects_missing_keys() -> None:
    model = _tiny_net()
    global_weights = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    model[0].requires_grad_(False)
    trainable = [p for n, p in model.named_parameters() if not n.startswith("0.")]
    with torch.no_grad():
        expected = 0.5 * float(sum((p**2).sum() for p in trainable))
        assert proximal_term(model, global_weights, 1.0).item() == pytest.approx(expected, rel=1e-6)
    del global_weights["3.bias"]
    with pytest.raises(ModelError, match=r"global weights lack parameter '3\.bias'"):
        proximal_term(model, global_weights, 1.0)


def test_fedprox_keeps_weights_closer_to_the_global_model() -> None:
    batches = _batches()
    global_weights = {k: v.clone() for k, v in _tiny_net().state_dict().items()}

    def drift(mu: float) -> float:
        model = _tiny_net()
        config = TrainConfig(steps=10, lr=0.05, proximal_mu=mu)
        LocalTrainer(model, config=config, device="cpu").fit(
            batches, global_weights=global_weights, progress=False
        )
        with torch.no_grad():
            return float(proximal_term(model, global_weights, 2.0))

    assert drift(mu=5.0) < 0.5 * drift(mu=0.0)


def test_gradient_clipping_bounds_each_sgd_update() -> None:
    model = _tiny_net()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    config = TrainConfig(steps=1, optimizer="sgd", lr=1.0, momentum=0.0, grad_clip=0.01)
    LocalTrainer(model, config=config, device="cpu").fit(_batches(num=1), progress=False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize(
    ("schedule", "factor_at_half"),
    [("constant", 1.0), ("cosine", 0.5), ("poly", 0.5**0.9)],
)
def test_lr_schedules(schedule: str, factor_at_half: float) -> None:
    trainer = LocalTrainer(
        _tiny_net(), config=TrainConfig(lr_schedule=schedule, steps=10), device="cpu"
    )
    assert trainer._lr_factor(0, 10) == pytest.approx(1.0)
    assert trainer._lr_factor(5, 10) == pytest.approx(factor_at_half)


def test_amp_is_ignored_on_cpu() -> None:
    results = []
    for amp in (True, False):
        model = _tiny_net()
        trainer = LocalTrainer(model, config=TrainConfig(steps=3, amp=amp), device="cpu")
        assert not trainer.use_amp
        trainer.fit(_batches(num=3), progress=False)
        results.append(model.state_dict())
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]), key


def test_self_ensembling_trains_student_and_keeps_an_ema_teacher() -> None:
    # Prepare
    model = _tiny_net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(steps=6, lr=0.05, loss="nr_dice", self_ensembling=True, ema_alpha=0.5)
    trainer = LocalTrainer(model, config=config, device="cpu")
    # Execute
    result = trainer.fit(_batches(num=3), progress=False)
    # Assert
    teacher = trainer.teacher
    assert teacher is not None and result.steps == 6
    assert teacher.num_updates >= 1 and teacher.num_updates + teacher.num_skipped == 6
    weight = "0.weight"
    t, s, s0 = teacher.model.state_dict()[weight], model.state_dict()[weight], start[weight]
    assert not torch.equal(t, s) and not torch.equal(t, s0)
    assert (t - s).norm() < (s0 - s).norm()  # the teacher follows the student


def test_diverging_training_raises_model_error() -> None:
    batches = _batches(num=1)
    batches[0]["image"][0, 0, 0, 0] = float("nan")
    trainer = LocalTrainer(_tiny_net(), config=TrainConfig(steps=1), device="cpu")
    with pytest.raises(ModelError, match="training loss became nan at step 0: lower lr"):
        trainer.fit(batches, progress=False)


def test_batches_without_label_or_data_raise_data_error() -> None:
    trainer = LocalTrainer(_tiny_net(), config=TrainConfig(steps=1), device="cpu")
    with pytest.raises(DataError, match="training batch has no 'label' entry"):
        trainer.fit([{"image": torch.zeros(1, 1, 8, 8)}], progress=False)
    with pytest.raises(DataError, match="the training batches are empty"):
        trainer.fit([], progress=False)


def test_schedule_without_known_length_needs_steps() -> None:
    config = TrainConfig(lr_schedule="cosine")
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
        ({"loss": "focal"}, "loss='focal' is unknown: use one of dice, dice_ce, nr_dice"),
        ({"gamma": 2.5}, r"gamma=2.5 must be in \[1, 2\]"),
        ({"ema_alpha": 1.0}, r"ema_alpha=1.0 must be in \[0, 1\)"),
        (
            {"self_ensembling": True},
            "does not combine with self_ensembling=True: use loss='nr_dice'",
        ),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_invalid_config_raises_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


def test_build_loss_uses_gamma() -> None:
    assert build_loss(TrainConfig(loss="nr_dice", gamma=1.2)).gamma == 1.2


# --- checkpoints --------------------------------------------------------------------------


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    # Prepare
    model = _tiny_net(seed=3)
    model(torch.randn(2, 1, 8, 8))  # moves BatchNorm statistics and its int64 counter
    state = model.state_dict()
    state_extra = {**state, "half": torch.randn(3, dtype=torch.bfloat16)}
    metadata = {"round": 3, "dice": 0.81, "config": {"lr": 1e-3}, "sites": ["A", "B"]}
    # Execute
    path = save_checkpoint(tmp_path / "sub" / "ckpt.safetensors", state_extra, metadata)
    loaded = load_checkpoint(path)
    # Assert
    assert loaded.metadata == metadata
    assert loaded.state_dict.keys() == state_extra.keys()
    for key, value in state_extra.items():
        assert loaded.state_dict[key].dtype == value.dtype, key
        assert torch.equal(loaded.state_dict[key], value), key
    fresh = _tiny_net(seed=9)
    fresh.load_state_dict(load_checkpoint(save_checkpoint(path, model, {})).state_dict)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert list(path.parent.iterdir()) == [path]  # no temporary files left


def test_checkpoint_file_is_plain_safetensors_without_pickle(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.safetensors", _tiny_net(), {"round": 1})
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    data_len = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert len(raw) == 8 + header_len + data_len  # header + raw tensor bytes, nothing else
    assert json.loads(header["__metadata__"]["fedmed"]) == {"round": 1}
    assert b"\x80\x02" not in raw[:8] and not raw.startswith(b"PK")  # no pickle, no zip


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"checkpoint .*missing\.safetensors does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(ModelError, match=r"bad\.safetensors is not a readable safetensors"):
        load_checkpoint(bad)
    with pytest.raises(ModelError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "x.safetensors", _tiny_net(), {"when": object()})


def test_public_api_is_pinned() -> None:
    import fedmed.train as module

    assert sorted(module.__all__) == [
        "LoadedCheckpoint",
        "LocalTrainer",
        "TrainConfig",
        "TrainResult",
        "build_loss",
        "load_checkpoint",
        "proximal_term",
        "save_checkpoint",
    ]
    assert all(hasattr(module, name) for name in module.__all__)
