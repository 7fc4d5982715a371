"""Record-level DP-SGD at a site: the patient is the record.

Each step samples patients by Poisson sampling (each independently with probability
``q = expected_patients_per_step / num_patients``, so a step's batch has a random size, possibly
zero), draws one patch or slice per sampled patient (``patient_sampler``: one record = one
patient), computes each record's gradient alone and clips it to L2 norm ``C``, sums the clipped
gradients, adds Gaussian noise ``N(0, (sigma C)^2)`` per coordinate, divides by the *expected*
batch size and takes one optimizer step (Abadi et al. 2016). That is the mechanism
dp_accounting's ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` accounts for, per step,
for one patient added or removed (:mod:`fedmed.security.accountant`). Anything computed from
the noisy gradients (the optimizer's moments, the weights sent) is post-processing.

Per-record gradients come from one forward/backward pass per record (a loop), not from Opacus
or ``torch.func.vmap``:

- Opacus 1.6 runs with torch 2.13 on these networks, but it samples records of a ``Dataset``
  (a site samples patients and draws one patch of each), its backward hooks warn when the input
  does not require a gradient, and it needs a grad-sampler per layer type; all to replace a
  dozen lines of clipping, as a new runtime dependency.
- ``vmap(grad(...))`` fails on fedmed's losses (they validate label values: data-dependent
  control flow) and on LAMP's activation checkpointing (saved-tensor hooks), and was ten times
  slower than the loop for COPLE-Net on CPU.
- The loop is exact for every layer and loss: group and instance norm normalise each record
  alone, dropout draws an independent mask per record, nothing couples two records. It costs B
  passes of one record instead of one pass of B; memory is one record's activations plus two
  copies of the gradients.

Batch norm couples the records of a batch (one patient's image changes every other patient's
normalised activations, so clipping per record bounds nothing): a BatchNorm model is a
ConfigError (COPLE-Net: ``norm="group"``, run config ``model-norm = "group"``). A model
partitioned over several devices (LAMP) is a ConfigError too. Noise comes from a generator
seeded from the OS (or from ``generator`` for tests); like Opacus outside its secure mode, the
floating-point representation of the noise is not hardened (Mironov 2012).

Example:
    >>> config = DpSgdConfig(noise_multiplier=1.0, clip_norm=1.0,
    ...                      expected_patients_per_step=8, steps=50, lr=0.05)
    >>> result = dp_sgd_round(model, loss_fn, sampler, config, num_patients=100)
    >>> result.sample_rate, round(result.epsilon, 2)
    (0.08, 4.8)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fedmed.errors import ConfigError, DataError, ModelError

from .accountant import LedgerEntry, record_epsilon

__all__ = [
    "DpSgdConfig",
    "DpSgdResult",
    "PatientSampler",
    "check_dp_model",
    "dp_sgd_round",
    "poisson_sample",
    "private_gradient",
]

logger = logging.getLogger(__name__)

# (patient index, generator) -> (image, label) of one patch/slice, without a batch dimension
PatientSampler = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
_EPS = 1e-6  # keeps C / norm finite; the clipped norm stays <= C


@dataclass(frozen=True)
class DpSgdConfig:
    """One site round of DP-SGD; invalid values raise ConfigError naming the run-config key.

    ``clip_norm`` bounds one patient's gradient (``dp-clip-norm`` in record mode);
    ``expected_patients_per_step`` is ``dp-patients-per-step``; ``steps`` the round's optimizer
    steps; ``delta`` only labels :attr:`DpSgdResult.epsilon`.

    Example:
        >>> DpSgdConfig(noise_multiplier=1.0, clip_norm=1.0, expected_patients_per_step=8,
        ...             steps=100).sample_rate(200)
        0.04
    """

    noise_multiplier: float
    clip_norm: float
    expected_patients_per_step: float
    steps: int
    delta: float = 1e-5
    lr: float = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.0

    def __post_init__(self) -> None:
        checks = (
            ("dp-noise-multiplier", self.noise_multiplier, self.noise_multiplier >= 0),
            ("dp-clip-norm", self.clip_norm, self.clip_norm > 0),
            (
                "dp-patients-per-step",
                self.expected_patients_per_step,
                0 < self.expected_patients_per_step < math.inf,
            ),
            ("dp-delta", self.delta, 0 < self.delta < 1),
            ("lr", self.lr, 0 < self.lr < math.inf),
            ("momentum", self.momentum, 0 <= self.momentum < 1),
        )
        for key, value, ok in checks:
            if not ok:
                raise ConfigError(
                    f"DP-SGD setting {key!r} is {value!r}: noise multiplier >= 0, clip norm > 0 "
                    "(inf only to compare with plain SGD), patients per step and lr > 0, "
                    "delta in (0, 1), momentum in [0, 1)"
                )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"DP-SGD steps is {self.steps!r}: must be an integer >= 1")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"DP-SGD optimizer is {self.optimizer!r}: use 'sgd' or 'adam'")
        if self.noise_multiplier == 0:
            logger.warning("DP-SGD with dp-noise-multiplier 0: gradients are clipped, no privacy")

    def sample_rate(self, num_patients: int) -> float:
        """Poisson rate ``q`` at a site with ``num_patients`` training patients (at most 1)."""
        if num_patients < 1:
            raise DataError("the site has no training patients: nothing to train on")
        return min(1.0, self.expected_patients_per_step / num_patients)

    def ledger_entry(self, *, num_patients: int, run: str, server_round: int) -> LedgerEntry:
        """The round this config trains, for the site's
        :class:`~fedmed.security.accountant.PrivacyLedger`: check it with ``epsilon_if`` before
        training, ``add`` it before the update leaves the site."""
        return LedgerEntry(
            run=run,
            round=server_round,
            mode="record",
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate(num_patients),
            steps=self.steps,
        )


@dataclass(frozen=True)
class DpSgdResult:
    """What :func:`dp_sgd_round` did. ``steps``, ``sample_rate``, ``noise_multiplier`` and
    ``epsilon`` (this round alone, add-remove of one patient, at the config's delta) may leave
    the site; ``records``, ``empty_steps``, ``clipped_fraction`` and ``loss`` (mean loss of the
    sampled records) depend on the data: for the site's log only."""

    steps: int
    sample_rate: float
    noise_multiplier: float
    epsilon: float
    records: int
    empty_steps: int
    clipped_fraction: float
    loss: float | None


def check_dp_model(model: nn.Module) -> None:
    """ConfigError unless ``model`` can be trained with per-record clipping: no batch norm, all
    parameters on one device, no partition into pipeline stages."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(
                f"model layer {name!r} is {type(module).__name__}: batch norm mixes the patients "
                "of a batch, so DP-SGD's per-patient clipping would not bound one patient's "
                'influence; set model-norm = "group" (COPLE-Net\'s group-norm variant) or use '
                "unet3d (instance norm)"
            )
    devices = {p.device for p in model.parameters()}
    placement = getattr(model, "placement", None)
    stages = len(getattr(placement, "sizes", ()) or ())
    if len(devices) > 1 or stages > 1:
        raise ConfigError(
            f"the model is partitioned ({stages or len(devices)} stages on "
            f"{sorted(str(d) for d in devices)}): DP-SGD with a partitioned LAMP model is not "
            "supported; run lamp_unet on one device, or unet3d, with dp-mode = 'record'"
        )


def poisson_sample(num_patients: int, sample_rate: float, generator: torch.Generator) -> Tensor:
    """Indices of the patients drawn this step, each independently with ``sample_rate``."""
    draws = torch.rand(num_patients, generator=generator)
    return torch.nonzero(draws < sample_rate).flatten()


def private_gradient(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    records: Sequence[tuple[Tensor, Tensor]],
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    noise_generator: torch.Generator | None = None,
) -> tuple[list[Tensor], list[float], list[float]]:
    """DP-SGD's gradient over the trainable parameters of ``model``:
    ``(sum_i clip(g_i, C) + N(0, (sigma C)^2)) / expected_batch_size``.

    ``records`` are ``(image, label)`` pairs without a batch dimension, each forwarded alone.
    Returns the gradients (in ``model.parameters()`` order, trainable ones), the records'
    losses and their gradient norms before clipping. ``clip_norm`` may be ``inf`` (no
    clipping; with ``noise_multiplier`` 0 this is plain SGD's gradient of the summed loss).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("the model has no trainable parameters: nothing to train")
    total = [torch.zeros_like(p) for p in params]
    losses: list[float] = []
    norms: list[float] = []
    for image, label in records:
        device = params[0].device
        loss = loss_fn(model(image.unsqueeze(0).to(device)), label.unsqueeze(0).to(device))
        if not torch.isfinite(loss):
            raise ModelError(
                f"DP-SGD loss became {float(loss.detach())}: lower lr or check the labels"
            )
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
        if not math.isfinite(norm):
            raise ModelError(f"a record's gradient norm is {norm}: lower lr")
        factor = min(1.0, clip_norm / (norm + _EPS))
        for acc, grad in zip(total, grads, strict=True):
            if grad is not None:
                acc.add_(grad, alpha=factor)
        losses.append(float(loss.detach()))
        norms.append(norm)
    std = noise_multiplier * clip_norm
    for acc in total:
        if std > 0:
            noise = torch.randn(
                acc.shape, generator=noise_generator, device=acc.device, dtype=acc.dtype
            )
            acc.add_(noise, alpha=std)
        acc.div_(expected_batch_size)
    return total, losses, norms


def _noise_generator(device: torch.device, generator: torch.Generator | None) -> torch.Generator:
    noise = torch.Generator(device=device)
    if generator is None:
        noise.seed()  # OS entropy: never a fixed seed in production
    else:
        noise.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return noise


def dp_sgd_round(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    patient_sampler: PatientSampler,
    config: DpSgdConfig,
    *,
    num_patients: int,
    generator: torch.Generator | None = None,
) -> DpSgdResult:
    """Train ``model`` in place for ``config.steps`` DP-SGD steps over ``num_patients``.

    ``patient_sampler(i, generator)`` returns one ``(image, label)`` record of patient ``i``
    (a random patch or slice, no batch dimension, on any device). ``generator`` (CPU) drives
    the Poisson sampling, the sampler and the noise seed; ``None`` seeds everything from the OS.
    The model stays on its device, in training mode; a fresh optimizer is built each round.
    """
    check_dp_model(model)
    rate = config.sample_rate(num_patients)
    if rate >= 1.0:
        logger.warning(
            "dp-patients-per-step %g >= the site's %d patients: every patient is in every "
            "step, no amplification by sampling",
            config.expected_patients_per_step,
            num_patients,
        )
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    params = [p for p in model.parameters() if p.requires_grad]
    noise_generator = _noise_generator(
        params[0].device if params else torch.device("cpu"), generator
    )
    if config.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=config.lr)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    model.train()
    losses: list[float] = []
    clipped = records = empty = 0
    for _ in range(config.steps):
        chosen = poisson_sample(num_patients, rate, generator).tolist()
        batch = [patient_sampler(i, generator) for i in chosen]
        grads, step_losses, norms = private_gradient(
            model,
            loss_fn,
            batch,
            clip_norm=config.clip_norm,
            noise_multiplier=config.noise_multiplier,
            expected_batch_size=config.expected_patients_per_step,
            noise_generator=noise_generator,
        )
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses += step_losses
        clipped += sum(n > config.clip_norm for n in norms)
        records += len(chosen)
        empty += not chosen
    epsilon = record_epsilon(
        sample_rate=rate,
        noise_multiplier=config.noise_multiplier,
        steps=config.steps,
        delta=config.delta,
    )
    logger.info(
        "DP-SGD: %d steps, q=%.4g, sigma=%g, C=%g: %d records (%d empty steps), %.0f%% "
        "clipped; epsilon of this round %.4g at delta %g",
        config.steps,
        rate,
        config.noise_multiplier,
        config.clip_norm,
        records,
        empty,
        100 * clipped / max(records, 1),
        epsilon,
        config.delta,
    )
    return DpSgdResult(
        steps=config.steps,
        sample_rate=rate,
        noise_multiplier=config.noise_multiplier,
        epsilon=epsilon,
        records=records,
        empty_steps=empty,
        clipped_fraction=clipped / records if records else 0.0,
        loss=sum(losses) / len(losses) if losses else None,
    )
