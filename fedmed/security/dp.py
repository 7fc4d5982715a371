"""Differential privacy for site updates: clipping, Gaussian noise and an RDP accountant.

Each round a site computes its update ``u = trained - global`` over the floating-point arrays
it was sent, clips it to L2 norm ``clip_norm`` (``u * min(1, C / ||u||)``), adds Gaussian noise
with standard deviation ``noise_multiplier * clip_norm`` to every coordinate and sends
``global + u_noised``. The noise is added at the site, so the guarantee holds against the
server and anyone who sees the message, not only against readers of the final model.
Integer arrays (e.g. BatchNorm's ``num_batches_tracked``) are sent unchanged; BatchNorm running
statistics are floats and get noise too: prefer ``fedbn = true`` (they stay at the site) or
instance-norm models with DP.

Accounting: every round is one Gaussian mechanism with sensitivity ``clip_norm`` and noise
multiplier ``sigma`` (site-level DP, neighbouring = the site's contribution present or absent,
no subsampling amplification since every site trains every round), so after ``T`` rounds the
Renyi DP at order ``a`` is ``T * a / (2 sigma^2)``, converted to ``(epsilon, delta)`` with the
bound of Canonne, Kamath & Steinke 2020 (Prop. 12 of arXiv:2004.00010 v4), minimised over the
same orders as Google's ``dp_accounting.rdp.RdpAccountant`` (and Flower's accountant, which
uses it). Against a server that compares one site's update with a *replaced* dataset the
sensitivity doubles: the same epsilon then holds for ``sigma / 2``.

Example:
    >>> params = DpParams(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    >>> round(gaussian_epsilon(noise_multiplier=1.0, rounds=1, delta=1e-5), 2)
    4.73
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmed.errors import ConfigError

__all__ = [
    "RDP_ORDERS",
    "DpParams",
    "clip_update",
    "gaussian_epsilon",
    "privacy_report_lines",
    "privatize",
    "update_norm",
]

RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
)


@dataclass(frozen=True)
class DpParams:
    """Client-side DP settings of a federation; ``clip_norm = 0`` turns DP off.

    Example:
        >>> DpParams(clip_norm=0.5, noise_multiplier=1.1).enabled
        True
        >>> DpParams.from_record(DpParams(clip_norm=0.5).to_record()).clip_norm
        0.5
    """

    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    max_epsilon: float = 0.0

    def __post_init__(self) -> None:
        checks = (
            ("dp-clip-norm", self.clip_norm, self.clip_norm >= 0),
            ("dp-noise-multiplier", self.noise_multiplier, self.noise_multiplier >= 0),
            ("dp-delta", self.delta, 0 < self.delta < 1),
            ("dp-max-epsilon", self.max_epsilon, self.max_epsilon >= 0),
        )
        for key, value, ok in checks:
            if not ok or value != value:
                raise ConfigError(
                    f"run config key {key!r} is {value!r}: clip norm, noise multiplier and max "
                    "epsilon must be >= 0 and delta in (0, 1)"
                )
        if self.noise_multiplier > 0 and self.clip_norm == 0:
            raise ConfigError(
                f"run config key 'dp-noise-multiplier' is {self.noise_multiplier} but "
                "'dp-clip-norm' is 0: noise needs a clipping bound; set dp-clip-norm > 0"
            )

    @property
    def enabled(self) -> bool:
        """True when sites clip (and, with a noise multiplier, add noise)."""
        return self.clip_norm > 0

    def epsilon(self, rounds: int) -> float:
        """Privacy spent after ``rounds`` rounds at ``delta`` (inf without noise)."""
        if rounds <= 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return gaussian_epsilon(
            noise_multiplier=self.noise_multiplier, rounds=rounds, delta=self.delta
        )

    def to_record(self) -> dict[str, float]:
        """The ConfigRecord ``privacy`` a train message carries."""
        return {
            "dp-clip-norm": float(self.clip_norm),
            "dp-noise-multiplier": float(self.noise_multiplier),
            "dp-delta": float(self.delta),
            "dp-max-epsilon": float(self.max_epsilon),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> DpParams:
        """Parse :meth:`to_record`'s output; an absent record means DP off."""
        if not record:
            return cls()
        return cls(
            clip_norm=float(record.get("dp-clip-norm", 0.0)),
            noise_multiplier=float(record.get("dp-noise-multiplier", 0.0)),
            delta=float(record.get("dp-delta", 1e-5)),
            max_epsilon=float(record.get("dp-max-epsilon", 0.0)),
        )


def gaussian_epsilon(*, noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``rounds`` compositions of the Gaussian mechanism (RDP)."""
    if noise_multiplier <= 0:
        return math.inf
    best = math.inf
    for order in RDP_ORDERS:
        rdp = rounds * order / (2.0 * noise_multiplier**2)
        if delta**2 + math.expm1(-rdp) > 0:
            return 0.0
        if order <= 1.01:
            continue
        eps = rdp + math.log1p(-1.0 / order) - math.log(delta * order) / (order - 1)
        best = min(best, eps)
    return max(0.0, best)


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
    """The arrays a DP site sends for the keys of ``received``, and metrics about it.

    Metrics: ``dp-update-norm`` (before clipping) and ``dp-clipped`` (1.0 when it was clipped).
    Draws noise from ``rng`` (default: a fresh OS-seeded generator: never a fixed seed).
    """
    rng = rng or np.random.default_rng()
    floats = set(_floating(received))
    # in the arrays' own dtype (float32 for the nets): float64 copies of a 10M-weight model
    # cost seconds; only the norm is summed in float64
    update = {k: np.subtract(trained[k], received[k], dtype=received[k].dtype) for k in floats}
    norm = update_norm(update)
    scale = min(1.0, params.clip_norm / norm) if norm > 0 else 1.0
    std = params.noise_multiplier * params.clip_norm
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


def privacy_report_lines(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown section (leading blank line) on the privacy spent, from the records' ``dp``."""
    spent = [(r.get("round"), r["dp"]) for r in records if r.get("dp")]
    if not spent:
        return []
    lines = [
        "",
        "## Differential privacy",
        "",
        "Client-side clipping + Gaussian noise; site-level (epsilon, delta) from an RDP "
        "accountant. Every train attempt counts, failed ones too.",
        "",
        "| round | epsilon | delta | releases | noise multiplier | clip norm |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for round_, dp in spent:
        eps = dp.get("epsilon")
        lines.append(
            f"| {round_} | {'inf (no noise)' if eps is None else f'{eps:.4f}'} | "
            f"{dp.get('delta')} | {dp.get('releases')} | {dp.get('noise-multiplier')} | "
            f"{dp.get('clip-norm')} |"
        )
    return lines
