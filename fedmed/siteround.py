"""One federated round at a site, with what the site keeps between rounds (:class:`SiteState`).

A round at a site, in order:

1. **Federated evaluation**: the received global model (with the site's own normalization
   statistics under ``fedbn``) is evaluated on the site's validation split *before* training:
   ``global-val-*`` metrics. The server selects its best checkpoint from these (never from
   its held-out test set).
2. **Local training** from the global model (FedAvg/FedProx; with SCAFFOLD every gradient is
   corrected by the control variates, :mod:`fedmed.scaffold`; with record-level DP, DP-SGD
   over the site's patients, :func:`dp_sgd_config`): the returned arrays and ``val-*`` metrics
   of the trained local model.
3. **Ditto** (``ditto-lambda`` > 0, Li et al., ICML 2021): the site's personal model trains for
   the same budget with ``lambda / 2 * ||v - w_global||^2`` tying it to the received global
   model; it never leaves the site; ``ditto-val-*`` metrics.

:class:`SiteState` is the site's own part of a run: SiloBN statistics, SCAFFOLD's ``c_i``,
Ditto's personal model, the samples trained on so far (the local-only baseline's budget). It
belongs to one run: the client app stores it under the run's identity (the hash of the run's
round-0 checkpoint), so a new run never starts from an old run's layers.

Example:
    >>> state = SiteState(run_id="abc")
    >>> result = run_site_round(task, received, cfg, state)
    >>> sorted(result.metrics)[:3]
    ['global-val-dice', 'global-val-hd95', 'global-val-n_cases']
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fedmed.globalmodel import local_norm_keys, model_arrays
from fedmed.io.msd import patient_id
from fedmed.losses import build_loss
from fedmed.patches import PatchSamples
from fedmed.roundconfig import TrainConfig, trainer_config
from fedmed.scaffold import GradientCorrection, zero_controls
from fedmed.security.dp import DpParams
from fedmed.security.dpsgd import DpSgdConfig, dp_sgd_round
from fedmed.task import SiteTask
from fedmed.train import TrainResult

__all__ = ["SiteRoundResult", "SiteState", "dp_sgd_config", "num_patients", "run_site_round"]

logger = logging.getLogger(__name__)

_PARTS = ("norm", "control", "personal")
Arrays = dict[str, np.ndarray]


@dataclass
class SiteState:
    """What a site keeps between the rounds of one run (never sent anywhere).

    Example:
        >>> state = SiteState(run_id="r1", samples=64.0)
        >>> SiteState.from_arrays("r1", state.to_arrays()).samples
        64.0
    """

    run_id: str
    norm: Arrays = field(default_factory=dict)
    control: Arrays = field(default_factory=dict)
    personal: Arrays = field(default_factory=dict)
    samples: float = 0.0
    rounds: int = 0

    def to_arrays(self) -> Arrays:
        """Flat ``part/key`` arrays (safetensors-ready) plus the counters."""
        out: Arrays = {"meta/samples": np.asarray([self.samples], np.float64)}
        out["meta/rounds"] = np.asarray([self.rounds], np.int64)
        for part in _PARTS:
            out.update({f"{part}/{k}": v for k, v in getattr(self, part).items()})
        return out

    @classmethod
    def from_arrays(cls, run_id: str, arrays: Mapping[str, np.ndarray]) -> SiteState:
        """Inverse of :meth:`to_arrays`."""
        state = cls(run_id=run_id)
        for key, value in arrays.items():
            part, _, name = key.partition("/")
            if part in _PARTS:
                getattr(state, part)[name] = np.asarray(value)
        if "meta/samples" in arrays:
            state.samples = float(np.asarray(arrays["meta/samples"]).ravel()[0])
        if "meta/rounds" in arrays:
            state.rounds = int(np.asarray(arrays["meta/rounds"]).ravel()[0])
        return state


@dataclass
class SiteRoundResult:
    """A round's reply content (model arrays, SCAFFOLD deltas, metrics) and the new state."""

    arrays: Arrays
    control_delta: Arrays
    metrics: dict[str, float]
    state: SiteState


def run_site_round(
    task: SiteTask,
    received: Mapping[str, np.ndarray],
    cfg: TrainConfig,
    state: SiteState,
    *,
    server_control: Mapping[str, np.ndarray] | None = None,
    dp_sgd: DpSgdConfig | None = None,
) -> SiteRoundResult:
    """One round at the site (see the module docstring); ``received`` are the global arrays,
    ``server_control`` SCAFFOLD's ``c`` (required when ``cfg.scaffold``), ``dp_sgd`` the
    round's DP-SGD (record-level DP; the caller has checked the site's budget)."""
    start = time.perf_counter()
    local = state.norm if cfg.fedbn else {}
    model = task.model(cfg, received, local_arrays=local)
    metrics = {f"global-val-{k}": v for k, v in task.evaluate(model, cfg).items()}
    delta: Arrays = {}
    if cfg.scaffold:
        if server_control is None:
            raise ValueError("a SCAFFOLD round needs the server's control variate")
        site_control = state.control or zero_controls(model)
        with GradientCorrection(model, server=server_control, site=site_control) as correction:
            result = task.fit(model, cfg)
        state.control = correction.new_site_control()
        delta = correction.site_delta()
    elif dp_sgd is not None:
        result = _fit_private(task, model, cfg, dp_sgd)
    else:
        result = task.fit(model, cfg)
    metrics.update(task.round_metrics(cfg, result))
    metrics.update({f"val-{k}": v for k, v in task.evaluate(model, cfg).items()})
    trained = model_arrays(model)
    if cfg.fedbn:
        state.norm = {k: trained[k] for k in local_norm_keys(model)}
    if cfg.ditto_lambda > 0:
        metrics.update(_ditto_round(task, received, cfg, state, local))
    state.samples += metrics["num-samples"]
    state.rounds += 1
    metrics["train-seconds"] = time.perf_counter() - start
    return SiteRoundResult({k: trained[k] for k in received}, delta, metrics, state)


def _ditto_round(
    task: SiteTask,
    received: Mapping[str, np.ndarray],
    cfg: TrainConfig,
    state: SiteState,
    local: Mapping[str, np.ndarray],
) -> dict[str, float]:
    """Train the personal model one round, tied to the received global model."""
    start = state.personal or {**received, **local}
    personal = task.model(cfg, start)
    anchor = {k: torch.as_tensor(np.asarray(v)) for k, v in received.items()}
    task.fit(personal, cfg, proximal_mu=cfg.ditto_lambda, anchor=anchor, seed_salt=1)
    state.personal = model_arrays(personal)
    return {f"ditto-val-{k}": v for k, v in task.evaluate(personal, cfg).items()}


def _patients(task: SiteTask) -> list[list[int]]:
    """The site's training cases grouped by patient (indices into ``task.train``)."""
    groups: dict[str, list[int]] = {}
    for index, case in enumerate(task.train_cases):
        groups.setdefault(patient_id(case["case_id"]), []).append(index)
    return list(groups.values())


def num_patients(task: SiteTask) -> int:
    """The site's training patients: DP-SGD's records (a patient's cases count once)."""
    return len(_patients(task))


def dp_sgd_config(task: SiteTask, cfg: TrainConfig, dp: DpParams) -> DpSgdConfig:
    """The round's DP-SGD at this site: ``local-steps`` steps, or ``local-epochs`` times as many
    steps as take every patient once in expectation; Adam at the round's learning rate."""
    per_epoch = max(1, math.ceil(num_patients(task) / dp.patients_per_step))
    return DpSgdConfig(
        noise_multiplier=dp.noise_multiplier,
        clip_norm=dp.clip_norm,
        expected_patients_per_step=dp.patients_per_step,
        steps=cfg.local_steps or cfg.local_epochs * per_epoch,
        delta=dp.delta,
        lr=cfg.lr,
        optimizer="adam",
    )


def _fit_private(
    task: SiteTask, model: torch.nn.Module, cfg: TrainConfig, config: DpSgdConfig
) -> TrainResult:
    """DP-SGD: one record = one patch or slice of one patient (a patient's cases pooled).

    The patient sampling, the patches and the noise draw from the operating system's entropy,
    never from the run's seed: the coordinator sets ``seed`` and the round, and could otherwise
    replay the sampling and subtract the noise, which would void the guarantee against it."""
    seed = secrets.randbits(31)
    samples = PatchSamples(task.train, cfg.patch_size, seed=seed)
    first = {}
    for index in range(len(samples)):
        first.setdefault(samples.case_of(index), index)
    patients = _patients(task)

    def sampler(patient: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cases = patients[patient]
        case = cases[int(torch.randint(len(cases), (1,), generator=generator))]
        sample = samples[first[case]]
        return sample["image"], sample["label"]

    local = trainer_config(cfg)
    loss_fn = build_loss(local.loss, nr_gamma=local.gamma, nr_denominator=local.nr_denominator).to(
        task.device
    )
    # generator None: dp_sgd_round seeds its sampling and noise generators from OS entropy
    result = dp_sgd_round(model, loss_fn, sampler, config, num_patients=len(patients))
    return TrainResult(
        loss=float(result.loss) if result.loss is not None else math.nan,
        num_examples=result.records,
        steps=result.steps,
        val_dice=None,
    )
