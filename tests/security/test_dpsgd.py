"""Record-level DP-SGD: per-record clipping, noise of the stated scale, Poisson sampling at the
stated rate, plain SGD without privacy, learning under weak noise, and the models it accepts."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.rdp import RdpAccountant
from torch import nn

from fedmed.errors import ConfigError
from fedmed.losses import DiceCELoss
from fedmed.nets import COPLENet, LAMPUNet, UNet3D
from fedmed.security.dpsgd import (
    DpSgdConfig,
    check_dp_model,
    dp_sgd_round,
    poisson_sample,
    private_gradient,
)


def _ce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, label[:, 0])


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(1, 2, 3, padding=1)


def _patients(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Patient i's record: a noisy 8x8 image whose label is where it is bright."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 8, 8, generator=gen)
    return [(img, (img > 0.3).long()) for img in images]


def _flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def test_a_huge_record_contributes_at_most_the_clip_norm() -> None:
    # Prepare: one ordinary record, one whose gradient is about 1e6 times larger
    model = _tiny()
    normal = _patients(1)[0]
    huge = (normal[0] * 1e6, normal[1])

    # Execute
    alone, _, _ = private_gradient(
        model, _ce, [normal], clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=1.0
    )
    both, _, norms = private_gradient(
        model, _ce, [normal, huge], clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=1.0
    )

    # Assert
    assert norms[1] > 1e4
    huge_part = _flat(both) - _flat(alone)
    assert float(huge_part.norm()) == pytest.approx(1.0, rel=1e-4)
    assert float(_flat(alone).norm()) <= 1.0 + 1e-6


def test_noise_std_is_sigma_c_over_the_expected_batch() -> None:
    # an empty batch: the gradient is noise only, over 2 x 16 x 3 x 3 x 3 x 100 coordinates
    model = nn.Sequential(*(nn.Conv3d(16, 16, 3, bias=False) for _ in range(100)))
    sigma, clip, batch = 1.3, 0.5, 4.0
    gen = torch.Generator().manual_seed(1)

    grads, _, _ = private_gradient(
        model,
        _ce,
        [],
        clip_norm=clip,
        noise_multiplier=sigma,
        expected_batch_size=batch,
        noise_generator=gen,
    )

    noise = _flat(grads)
    assert noise.numel() == 100 * 16 * 16 * 27
    assert float(noise.std()) == pytest.approx(sigma * clip / batch, rel=0.01)
    assert abs(float(noise.mean())) < 0.01 * sigma * clip / batch


def test_poisson_sampling_draws_each_patient_at_rate_q() -> None:
    gen = torch.Generator().manual_seed(2)
    n, q, draws = 500, 0.06, 400

    counts = torch.zeros(n)
    sizes = []
    for _ in range(draws):
        chosen = poisson_sample(n, q, gen)
        counts[chosen] += 1
        sizes.append(len(chosen))

    standard_error = math.sqrt(q * (1 - q) / (n * draws))
    assert abs(float(counts.sum()) / (n * draws) - q) < 4 * standard_error
    assert len(set(sizes)) > 5  # the batch size varies
    assert float(counts.max()) / draws < 3 * q  # no patient is favoured


def test_round_samples_at_q_and_reports_this_rounds_epsilon() -> None:
    # Prepare
    patients = _patients(50)
    calls: list[int] = []

    def sampler(i: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(i)
        return patients[i]

    config = DpSgdConfig(
        noise_multiplier=1.0, clip_norm=1.0, expected_patients_per_step=5, steps=40
    )

    # Execute
    result = dp_sgd_round(
        _tiny(), _ce, sampler, config, num_patients=50, generator=torch.Generator().manual_seed(3)
    )

    # Assert
    reference = RdpAccountant()
    reference.compose(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 40
    )
    assert result.sample_rate == pytest.approx(0.1)
    assert result.records == len(calls)
    assert abs(len(calls) / (40 * 50) - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 2000)
    assert result.epsilon == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    entry = config.ledger_entry(num_patients=50, run="r", server_round=2)
    assert (entry.mode, entry.steps, entry.noise_multiplier) == ("record", 40, 1.0)
    assert entry.sample_rate == result.sample_rate


def test_without_noise_or_clipping_it_is_plain_sgd_on_the_batch() -> None:
    # Prepare: q = 1 (every patient every step), sigma 0, C = inf
    patients = _patients(6)
    private, plain = _tiny(), _tiny()
    config = DpSgdConfig(
        noise_multiplier=0.0, clip_norm=math.inf, expected_patients_per_step=6, steps=5, lr=0.3
    )
    images = torch.stack([p[0] for p in patients])
    labels = torch.stack([p[1] for p in patients])

    # Execute
    dp_sgd_round(private, _ce, lambda i, g: patients[i], config, num_patients=6)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.3)
    for _ in range(5):
        optimizer.zero_grad()
        _ce(plain(images), labels).backward()  # mean over the 6 records
        optimizer.step()

    # Assert
    for a, b in zip(private.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tiny_model_learns_at_epsilon_4() -> None:
    # Prepare
    train, held_out = _patients(100, seed=4), _patients(30, seed=5)
    model = _tiny()
    images = torch.stack([p[0] for p in held_out])
    labels = torch.stack([p[1] for p in held_out])
    with torch.no_grad():
        before = float(_ce(model(images), labels))
    config = DpSgdConfig(
        noise_multiplier=1.0, clip_norm=1.0, expected_patients_per_step=8, steps=30, lr=0.5
    )

    # Execute
    result = dp_sgd_round(
        model,
        _ce,
        lambda i, g: train[i],
        config,
        num_patients=100,
        generator=torch.Generator().manual_seed(6),
    )

    # Assert
    with torch.no_grad():
        after = float(_ce(model(images), labels))
        accuracy = float((model(images).argmax(1, keepdim=True) == labels).float().mean())
    assert after < 0.5 * before
    assert accuracy > 0.85
    assert result.epsilon < 5


def test_records_do_not_interact_in_an_instance_norm_unet() -> None:
    # with C = inf and no noise, two records' summed gradients equal the gradient of their
    # summed losses in one batch: instance norm couples nothing across records
    torch.manual_seed(0)
    model = UNet3D(features=(4, 8)).train()
    x = torch.randn(2, 1, 8, 8, 8)
    y = (x > 0).long()
    loss_fn = DiceCELoss()

    grads, losses, _ = private_gradient(
        model,
        loss_fn,
        [(x[0], y[0]), (x[1], y[1])],
        clip_norm=math.inf,
        noise_multiplier=0.0,
        expected_batch_size=1.0,
    )
    out = model(x)
    batched = torch.autograd.grad(
        loss_fn(out[:1], y[:1]) + loss_fn(out[1:], y[1:]), list(model.parameters())
    )

    torch.testing.assert_close(_flat(grads), _flat(list(batched)), rtol=1e-4, atol=1e-6)
    assert len(losses) == 2


@pytest.mark.parametrize(
    "build",
    [
        lambda: COPLENet(features=(8, 16, 32, 64, 128), norm="group"),
        lambda: UNet3D(features=(4, 8), dropout=0.3),
        lambda: LAMPUNet(features=(4, 8), chunks=2),
    ],
    ids=["coplenet-group", "unet3d-dropout", "lamp-one-device"],
)
def test_dp_sgd_trains_fedmed_networks(build) -> None:
    # Prepare
    model = build()
    shape = (1, 32, 32) if isinstance(model, COPLENet) else (1, 8, 8, 8)
    gen = torch.Generator().manual_seed(7)
    records = [torch.randn(shape, generator=gen) for _ in range(6)]
    before = [p.detach().clone() for p in model.parameters()]
    config = DpSgdConfig(noise_multiplier=1.0, clip_norm=1.0, expected_patients_per_step=3, steps=2)

    # Execute
    result = dp_sgd_round(
        model,
        DiceCELoss(),
        lambda i, g: (records[i], (records[i] > 0).long()),
        config,
        num_patients=6,
        generator=gen,
    )

    # Assert
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    assert all(changed)  # noise reaches every parameter
    assert result.steps == 2 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: COPLENet(features=(8, 16, 32, 64, 128)), 'set model-norm = "group"'),
        (lambda: UNet3D(features=(4, 8), norm=nn.BatchNorm3d), "BatchNorm3d: batch norm mixes"),
        (
            lambda: LAMPUNet(features=(4, 8), devices=["cpu", "cpu"], balance=[2, 2]),
            "DP-SGD with a partitioned LAMP model is not supported",
        ),
    ],
    ids=["coplenet-batch-norm", "unet-batch-norm", "lamp-partitioned"],
)
def test_models_dp_sgd_cannot_train_are_config_errors(build, match) -> None:
    with pytest.raises(ConfigError, match=match):
        check_dp_model(build())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_norm": 0.0}, "'dp-clip-norm' is 0.0"),
        ({"noise_multiplier": -1.0}, "'dp-noise-multiplier' is -1.0"),
        ({"expected_patients_per_step": 0}, "'dp-patients-per-step' is 0"),
        ({"steps": 0}, "steps is 0"),
        ({"optimizer": "rmsprop"}, "optimizer is 'rmsprop'"),
    ],
    ids=["clip", "noise", "patients", "steps", "optimizer"],
)
def test_invalid_dp_sgd_settings_are_refused(kwargs, match) -> None:
    options = {
        "noise_multiplier": 1.0,
        "clip_norm": 1.0,
        "expected_patients_per_step": 4,
        "steps": 10,
    } | kwargs
    with pytest.raises(ConfigError, match=match):
        DpSgdConfig(**options)


def test_more_patients_per_step_than_patients_means_q_one() -> None:
    config = DpSgdConfig(noise_multiplier=1.0, clip_norm=1.0, expected_patients_per_step=8, steps=1)

    assert config.sample_rate(5) == 1.0
    assert config.sample_rate(200) == pytest.approx(0.04)
    assert np.isclose(config.sample_rate(8), 1.0)


def test_dropout_draws_an_independent_mask_per_record() -> None:
    # two copies of one record: equal gradients without dropout, different ones with it
    torch.manual_seed(0)
    x = torch.randn(1, 8, 8, 8)
    record = (x, (x > 0).long())
    norms = {}
    for p in (0.0, 0.5):
        model = UNet3D(features=(4, 8), dropout=p)
        _, _, norms[p] = private_gradient(
            model,
            DiceCELoss(),
            [record, record],
            clip_norm=math.inf,
            noise_multiplier=0.0,
            expected_batch_size=1.0,
        )

    assert norms[0.0][0] == pytest.approx(norms[0.0][1], rel=1e-6)
    assert norms[0.5][0] != pytest.approx(norms[0.5][1], rel=1e-3)
