"""Differential privacy settings, and site-level DP: a site's whole update clipped and noised.

Three modes (run config ``dp-mode``):

- ``record``: DP-SGD inside each site (:mod:`fedmed.security.dpsgd`); the unit is the patient,
  ``dp-clip-norm`` bounds one patient's gradient, each site accounts for its own epsilon
  (:mod:`fedmed.security.accountant`) and refuses rounds beyond its budget.
- ``site``: each round a site computes ``u = trained - global`` over the floating-point arrays
  it was sent, clips it to L2 norm ``C = dp-clip-norm`` (``u * min(1, C / ||u||)``), adds
  Gaussian noise of std ``sigma * C`` to every coordinate (``sigma = dp-noise-multiplier``) and
  sends ``global + u_noised``. The noise is added at the site, so the guarantee holds against
  the coordinator and anyone who sees the message. The unit is the site's whole contribution.
- ``off``. Without ``dp-mode``, ``dp-clip-norm > 0`` means ``site`` (the meaning it had before
  modes existed), otherwise ``off``.

Site-level accounting: one Gaussian release per round (every train attempt counts), composed
by Google's ``dp_accounting`` RDP accountant; no subsampling amplification (the server picks
sites openly). ``dp-adjacency`` (site mode): ``replace-one`` (default; sensitivity ``2C``: the
coordinator sees which sites send, so what it can compare is a site's update against the same
site with other data) or ``add-remove`` (sensitivity ``C``: a site's contribution present or
absent). At sigma 1.1, delta 1e-5, 10 rounds: epsilon 42.6 replace-one, 16.9 add-remove.

Under SecAgg+ (the server sets ``secure_sites`` n and ``min_secure_sites`` m in the round's
``privacy`` record) the noise is *distributed*: each site adds std ``sigma * C / sqrt(m)``, so
the unmasked sum of the s >= m sites that stay carries ``sigma * C * sqrt(s / m) >= sigma * C``
and the stated epsilon holds whichever allowed sites drop out. With m = n a dropped site's share
is missing: the sum carries ``sigma * C * sqrt((n - d) / n)``
(:func:`~fedmed.security.accountant.aggregate_noise_multiplier` gives the multiplier to account
with). Distributed noise needs equal aggregation weights:
:func:`reduce_metrics` sends ``num-examples = 1``.

Integer arrays (BatchNorm's ``num_batches_tracked``) are sent unchanged; BatchNorm running
statistics are floats and get noise too: prefer ``fedbn = true`` or group/instance norm models.

Example:
    >>> params = DpParams(clip_norm=1.0, noise_multiplier=1.1, delta=1e-5)
    >>> params.mode, params.adjacency
    ('site', 'replace-one')
    >>> round(params.epsilon(10), 1)
    42.6
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmed.errors import ConfigError

from .accountant import ADJACENCIES, LedgerEntry, gaussian_epsilon

__all__ = [
    "DP_MODES",
    "RELEASED_METRICS",
    "DpParams",
    "clip_update",
    "expected_noise_norm",
    "privatize",
    "reduce_metrics",
    "update_norm",
]

logger = logging.getLogger(__name__)

DP_MODES = ("record", "site", "off")
# What a site's metrics may hold under DP: the public aggregation weight, the configured step
# count, and the privacy record (parameters and the epsilon computed from them).
RELEASED_METRICS = (
    "num-examples",
    "num-steps",
    "dp-epsilon",
    "dp-delta",
    "dp-noise-multiplier",
    "dp-sample-rate",
    "dp-steps",
    "dp-epsilon-total",
)


@dataclass(frozen=True)
class DpParams:
    """A federation's DP settings (run config ``dp-*``), validated; mode ``off`` turns DP off.

    ``mode`` ``""`` resolves to ``site`` when ``clip_norm > 0``, else ``off``; ``adjacency``
    ``""`` to ``replace-one`` (site) or ``add-remove`` (record). ``clip_norm`` is per patient
    in record mode, per update in site mode. ``patients_per_step`` is DP-SGD's expected
    patients per step (record mode). ``secure_sites`` / ``min_secure_sites`` are set by the
    server for a SecAgg+ round (distributed noise, site mode).

    Example:
        >>> DpParams(clip_norm=0.5, noise_multiplier=1.1).enabled
        True
        >>> DpParams.from_record(DpParams(mode="record", clip_norm=1.0, noise_multiplier=1.0)
        ...                      .to_record()).mode
        'record'
    """

    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    max_epsilon: float = 0.0
    mode: str = ""
    adjacency: str = ""
    patients_per_step: float = 8.0
    secure_sites: int = 0
    min_secure_sites: int = 0

    def __post_init__(self) -> None:
        checks = (
            ("dp-clip-norm", self.clip_norm, self.clip_norm >= 0),
            ("dp-noise-multiplier", self.noise_multiplier, self.noise_multiplier >= 0),
            ("dp-delta", self.delta, 0 < self.delta < 1),
            ("dp-max-epsilon", self.max_epsilon, self.max_epsilon >= 0),
            ("dp-patients-per-step", self.patients_per_step, self.patients_per_step > 0),
        )
        for key, value, ok in checks:
            if not ok or value != value or value == math.inf:
                raise ConfigError(
                    f"run config key {key!r} is {value!r}: clip norm, noise multiplier and max "
                    "epsilon must be finite and >= 0, delta in (0, 1), patients per step > 0"
                )
        mode = self.mode or ("site" if self.clip_norm > 0 else "off")
        if mode not in DP_MODES:
            raise ConfigError(
                f"run config key 'dp-mode' is {self.mode!r}: use 'record' (DP-SGD per patient "
                "at each site), 'site' (each site's update clipped and noised) or 'off'"
            )
        object.__setattr__(self, "mode", mode)
        self._check_mode()
        adjacency = self.adjacency or ("add-remove" if mode == "record" else "replace-one")
        if adjacency not in ADJACENCIES:
            raise ConfigError(
                f"run config key 'dp-adjacency' is {self.adjacency!r}: use 'replace-one' or "
                "'add-remove'"
            )
        if mode == "record" and adjacency != "add-remove":
            raise ConfigError(
                "run config key 'dp-adjacency' is 'replace-one' but dp-mode is 'record': "
                "record-level epsilon is for one patient added or removed (dp-accounting has no "
                "replace-one accountant for Poisson sampling); remove dp-adjacency"
            )
        object.__setattr__(self, "adjacency", adjacency)
        self._check_secure()

    def _check_mode(self) -> None:
        if self.mode == "off":
            for key, value in (
                ("dp-clip-norm", self.clip_norm),
                ("dp-noise-multiplier", self.noise_multiplier),
                ("dp-max-epsilon", self.max_epsilon),
            ):
                if value > 0:
                    raise ConfigError(
                        f"run config key {key!r} is {value:g} but DP is off (dp-mode "
                        f"{self.mode!r}, dp-clip-norm {self.clip_norm:g}): set dp-mode = "
                        "'record' or 'site' with dp-clip-norm > 0, or remove the dp-* keys"
                    )
        elif self.clip_norm == 0:
            unit = "one patient's gradient" if self.mode == "record" else "a site's update"
            raise ConfigError(
                f"dp-mode is {self.mode!r} but run config key 'dp-clip-norm' is 0: set the "
                f"L2 bound on {unit}, e.g. dp-clip-norm = 1.0"
            )
        elif self.mode == "record" and self.noise_multiplier == 0:
            raise ConfigError(
                "dp-mode is 'record' but run config key 'dp-noise-multiplier' is 0: DP-SGD "
                "without noise protects nobody; set it > 0, e.g. 1.0"
            )

    def _check_secure(self) -> None:
        n, m = self.secure_sites, self.min_secure_sites
        if n < 0 or m < 0 or m > n or (n > 0 and self.mode != "site"):
            raise ConfigError(
                f"privacy record has dp-secure-sites {n} and dp-min-secure-sites {m}: need "
                "0 <= min <= sites, and distributed noise only in dp-mode 'site'; server and "
                "site run different fedmed versions?"
            )
        if n > 0 and m == 0:
            object.__setattr__(self, "min_secure_sites", n)

    @property
    def enabled(self) -> bool:
        """True unless ``mode`` is ``off``."""
        return self.mode != "off"

    @property
    def noise_std(self) -> float:
        """Std of the noise one site adds per coordinate in site mode (distributed under
        SecAgg+: its share for ``min_secure_sites`` sites)."""
        std = self.noise_multiplier * self.clip_norm
        return std / math.sqrt(self.min_secure_sites) if self.secure_sites else std

    def secure(self, sites: int, *, min_sites: int = 0) -> DpParams:
        """These settings for a SecAgg+ round of ``sites`` sites of which at least
        ``min_sites`` (default: all) must stay for the sum to be unmasked."""
        return dataclasses.replace(self, secure_sites=sites, min_secure_sites=min_sites)

    def epsilon(self, rounds: int) -> float:
        """Site-level epsilon after ``rounds`` releases at ``delta`` under ``adjacency``
        (inf without noise). Record mode: each site's ledger knows its epsilon, not this."""
        if self.mode != "site":
            raise ValueError(f"DpParams.epsilon is site-level; dp-mode is {self.mode!r}")
        return gaussian_epsilon(
            noise_multiplier=self.noise_multiplier,
            rounds=rounds,
            delta=self.delta,
            adjacency=self.adjacency,
        )

    def to_record(self) -> dict[str, float | int | str]:
        """The ConfigRecord ``privacy`` a train message carries."""
        return {
            "dp-mode": self.mode,
            "dp-clip-norm": float(self.clip_norm),
            "dp-noise-multiplier": float(self.noise_multiplier),
            "dp-delta": float(self.delta),
            "dp-max-epsilon": float(self.max_epsilon),
            "dp-adjacency": self.adjacency,
            "dp-patients-per-step": float(self.patients_per_step),
            "dp-secure-sites": int(self.secure_sites),
            "dp-min-secure-sites": int(self.min_secure_sites),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> DpParams:
        """Parse :meth:`to_record`'s output; an absent record means DP off (a record without
        ``dp-mode``, from an older server, means site mode when it clips)."""
        if not record:
            return cls()
        return cls(
            clip_norm=float(record.get("dp-clip-norm", 0.0)),
            noise_multiplier=float(record.get("dp-noise-multiplier", 0.0)),
            delta=float(record.get("dp-delta", 1e-5)),
            max_epsilon=float(record.get("dp-max-epsilon", 0.0)),
            mode=str(record.get("dp-mode", "")),
            adjacency=str(record.get("dp-adjacency", "")),
            patients_per_step=float(record.get("dp-patients-per-step", 8.0)),
            secure_sites=int(record.get("dp-secure-sites", 0)),
            min_secure_sites=int(record.get("dp-min-secure-sites", 0)),
        )

    def ledger_entry(self, *, run: str, server_round: int) -> LedgerEntry:
        """A site-mode (or DP-off) round as a :class:`~fedmed.security.accountant.LedgerEntry`:
        the noise the released update or secure sum carries at the least."""
        if self.mode == "record":
            raise ValueError("record-mode rounds come from dp_sgd_round's result")
        return LedgerEntry(
            run=run, round=server_round, mode=self.mode, noise_multiplier=self.noise_multiplier
        )


def expected_noise_norm(
    num_params: int,
    noise_multiplier: float,
    clip_norm: float,
    *,
    steps: int = 1,
    lr: float = 1.0,
    expected_batch: float = 1.0,
) -> float:
    """Expected L2 norm of the DP noise in an update of ``num_params`` values.

    Site mode (defaults): ``sigma * C * sqrt(d)``, e.g. the bound an update-norm check must
    allow for beyond ``C``; the norm of d Gaussians concentrates within ``sigma * C`` of it.
    Record mode with plain SGD: ``steps`` steps of noise ``lr * sigma * C / expected_batch``:
    ``lr * sigma * C * sqrt(steps * d) / expected_batch`` (momentum or Adam change it).

    Example:
        >>> round(expected_noise_norm(10_521_666, 1.1, 1.0))
        3568
    """
    per_step = lr * noise_multiplier * clip_norm / expected_batch
    return per_step * math.sqrt(steps * num_params)


def _floating(arrays: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k in sorted(arrays) if np.issubdtype(np.asarray(arrays[k]).dtype, np.floating)]


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over the floating-point arrays of ``update`` (float64 sum)."""
    total = 0.0
    for key in _floating(update):
        value = np.asarray(update[key], dtype=np.float64)
        total += float(np.dot(value.ravel(), value.ravel()))
    return math.sqrt(total)


def clip_update(
    update: Mapping[str, np.ndarray], clip_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """``update`` scaled to L2 norm at most ``clip_norm``; also returns the norm before."""
    norm = update_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = {
        k: (np.asarray(v) * scale).astype(np.asarray(v).dtype) if k in set(_floating(update)) else v
        for k, v in update.items()
    }
    return clipped, norm


def privatize(
    trained: Mapping[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    params: DpParams,
    *,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The arrays a site-mode DP site sends for the keys of ``received``, and metrics about it.

    Noise std is :attr:`DpParams.noise_std` (a share of it under SecAgg+). Metrics, for the
    site's own log only: ``dp-update-norm`` (before clipping) and ``dp-clipped`` (1.0 when it
    was clipped). Draws noise from ``rng`` (default: a fresh OS-seeded generator).
    """
    if params.mode != "site":
        raise ValueError(f"privatize is site-level DP; dp-mode is {params.mode!r}")
    rng = rng or np.random.default_rng()
    floats = set(_floating(received))
    # in the arrays' own dtype (float32 for the nets): float64 copies of a 10M-weight model
    # cost seconds; only the norm is summed in float64
    update = {k: np.subtract(trained[k], received[k], dtype=received[k].dtype) for k in floats}
    norm = update_norm(update)
    scale = min(1.0, params.clip_norm / norm) if norm > 0 else 1.0
    std = params.noise_std
    out: dict[str, np.ndarray] = {}
    for key, base in received.items():
        if key not in floats:
            out[key] = np.asarray(trained[key])
            continue
        delta = update[key]
        if scale < 1.0:
            delta *= delta.dtype.type(scale)
        if std > 0:
            noise_dtype = np.float32 if delta.dtype == np.float32 else np.float64
            noise = rng.standard_normal(delta.shape, dtype=noise_dtype)
            noise *= std
            delta += noise.astype(delta.dtype, copy=False)
        delta += base
        out[key] = delta
    metrics = {"dp-update-norm": norm, "dp-clipped": float(norm > params.clip_norm)}
    return out, metrics


def reduce_metrics(
    metrics: Mapping[str, float], params: DpParams, *, num_train_cases: int
) -> dict[str, float]:
    """What of a site's round metrics may leave it under DP (all of them with DP off).

    Kept: ``num-examples`` replaced by a public value (the site's number of training cases,
    which the roster already announced; ``1`` in a SecAgg+ round with distributed noise, whose
    sum must weight sites equally), ``num-steps`` (set by the run config) and the ``dp-*``
    privacy record. Dropped: everything else, e.g. ``train-loss`` (a function of the training
    patients), ``val-dice`` / ``val-hd95`` (of the validation patients: with a handful of them a
    noised Dice would be noise) and ``train-seconds`` (a timing side channel of the batch
    sizes). The site's log keeps the full metrics.

    Example:
        >>> reduce_metrics({"num-examples": 812.0, "train-loss": 0.4, "val-dice": 0.7},
        ...                DpParams(clip_norm=1.0, noise_multiplier=1.0), num_train_cases=20)
        {'num-examples': 20.0}
    """
    if not params.enabled:
        return dict(metrics)
    if num_train_cases < 1:
        raise ValueError(f"num_train_cases must be >= 1, got {num_train_cases}")
    kept = {k: float(v) for k, v in metrics.items() if k in RELEASED_METRICS}
    kept["num-examples"] = 1.0 if params.secure_sites else float(num_train_cases)
    dropped = sorted(set(metrics) - set(kept))
    if dropped:
        logger.info("DP (%s mode): metrics kept at the site: %s", params.mode, ", ".join(dropped))
    return kept
