"""Combine the sites' validated updates into the next global weights.

Plain functions over ``dict[str, np.ndarray]`` (one per aggregation rule) and one
:class:`Aggregator` that picks the rule from the run settings and carries the FedAdam/FedYogi
server-optimizer state across rounds (saved in each checkpoint so a resumed run continues the
same trajectory).

- fedavg / fedprox: average weighted by ``num-examples`` (FedProx differs only at the sites,
  which add ``proximal-mu``/2 * ||w - w_global||^2 to their loss).
- fedadam / fedyogi: the weighted average gives a pseudo-gradient ``delta = avg - current``
  that a server-side Adam/Yogi step applies (Reddi et al., 2021; same formulas as Flower's).
- fedmedian: coordinate-wise median; trimmed-mean: coordinate-wise mean after cutting
  ``trim-fraction`` of the values at each end (both unweighted, robust to outliers).
- scaffold: FedAvg of the models, plus the server control variate moved by the sites' control
  changes (:mod:`fedmed.scaffold`), kept in the server state like the optimizer's.
- FedBN is not a rule here: the server never sends or receives the sites' normalization
  statistics, so they never reach the aggregator (see ``fedmed.globalmodel.local_norm_keys``).

Weights are the sites' ``num-examples`` as validated (:mod:`.validation`): positive, finite and
no more than each site announced; their sum must be a positive finite number, or the
aggregation refuses (a ValueError the round loop reports).

Arrays are averaged in float64 and cast back to the global model's dtype; integer buffers
(e.g. BatchNorm's ``num_batches_tracked``) are rounded.

Example:
    >>> import numpy as np
    >>> a = {"w": np.array([0.0, 2.0], np.float32)}
    >>> b = {"w": np.array([2.0, 4.0], np.float32)}
    >>> weighted_average([a, b], [1, 3])["w"].tolist()
    [1.5, 3.5]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedmed.runsettings import RunSettings
from fedmed.scaffold import update_server_control

logger = logging.getLogger(__name__)

__all__ = [
    "Aggregator",
    "ServerOptimizer",
    "SiteUpdate",
    "coordinate_median",
    "trimmed_mean",
    "weighted_average",
]

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class SiteUpdate:
    """One validated reply: the site's arrays, its training-sample count and its metrics.

    Example:
        >>> import numpy as np
        >>> SiteUpdate("A", {"w": np.zeros(2)}, 10, {"val-dice": 0.8}).num_examples
        10
    """

    site: str
    arrays: Arrays
    num_examples: float
    metrics: Mapping[str, float]
    controls: Arrays = field(default_factory=dict)


def _cast_like(value: np.ndarray, ref: np.ndarray) -> np.ndarray:
    if np.issubdtype(ref.dtype, np.integer) or ref.dtype == np.bool_:
        value = np.rint(value)
    return np.asarray(value, dtype=ref.dtype)


def _stack(arrays_list: Sequence[Mapping[str, np.ndarray]], key: str) -> np.ndarray:
    return np.stack([np.asarray(a[key], dtype=np.float64) for a in arrays_list])


def _check_nonempty(arrays_list: Sequence[Mapping[str, np.ndarray]]) -> None:
    if not arrays_list:
        raise ValueError("no updates to aggregate")


def weighted_average(
    arrays_list: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> Arrays:
    """Per-key average of ``arrays_list`` weighted by ``weights`` (FedAvg)."""
    _check_nonempty(arrays_list)
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(over="ignore"):
        total = float(w.sum())
    if len(w) != len(arrays_list) or not np.isfinite(w).all() or w.min() < 0:
        raise ValueError(
            f"weights {list(weights)} must be one finite non-negative value per update"
        )
    if not (np.isfinite(total) and total > 0):
        raise ValueError(f"weights {list(weights)} sum to {total}: not a positive finite number")
    first = arrays_list[0]
    return {
        key: _cast_like(np.tensordot(w / w.sum(), _stack(arrays_list, key), axes=1), ref)
        for key, ref in first.items()
    }


def coordinate_median(arrays_list: Sequence[Mapping[str, np.ndarray]]) -> Arrays:
    """Per-coordinate median of the updates (FedMedian)."""
    _check_nonempty(arrays_list)
    first = arrays_list[0]
    return {
        key: _cast_like(np.median(_stack(arrays_list, key), axis=0), ref)
        for key, ref in first.items()
    }


def trimmed_mean(
    arrays_list: Sequence[Mapping[str, np.ndarray]], *, trim_fraction: float
) -> Arrays:
    """Per-coordinate mean after cutting ``int(trim_fraction * n)`` values at each end."""
    _check_nonempty(arrays_list)
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction {trim_fraction} must be in [0, 0.5)")
    n = len(arrays_list)
    cut = int(trim_fraction * n)
    first = arrays_list[0]
    out: Arrays = {}
    for key, ref in first.items():
        ordered = np.sort(_stack(arrays_list, key), axis=0)
        out[key] = _cast_like(ordered[cut : n - cut].mean(axis=0), ref)
    return out


class ServerOptimizer:
    """Adam or Yogi applied on the server to the pseudo-gradient ``averaged - current``.

    Example:
        >>> import numpy as np
        >>> opt = ServerOptimizer(kind="fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
        >>> new = opt.step({"w": np.zeros(2)}, {"w": np.ones(2)})
        >>> bool((new["w"] > 0).all())
        True
    """

    def __init__(self, *, kind: str, lr: float, beta1: float, beta2: float, tau: float) -> None:
        if kind not in ("fedadam", "fedyogi"):
            raise ValueError(f"kind {kind!r} must be 'fedadam' or 'fedyogi'")
        self.kind = kind
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.steps = 0
        self.m: Arrays = {}
        self.v: Arrays = {}

    def step(self, current: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray]) -> Arrays:
        """Return the new global arrays; integer arrays take the average unchanged."""
        self.steps += 1
        out: Arrays = {}
        for key, cur in current.items():
            if not np.issubdtype(cur.dtype, np.floating):
                out[key] = np.asarray(averaged[key], dtype=cur.dtype)
                continue
            x = cur.astype(np.float64)
            delta = averaged[key].astype(np.float64) - x
            m = self.m.get(key, np.zeros_like(x))
            v = self.v.get(key, np.zeros_like(x))
            m = self.beta1 * m + (1 - self.beta1) * delta
            sq = delta**2
            if self.kind == "fedadam":
                v = self.beta2 * v + (1 - self.beta2) * sq
                eta = self.lr * np.sqrt(1 - self.beta2**self.steps) / (1 - self.beta1**self.steps)
            else:
                v = v - (1 - self.beta2) * sq * np.sign(v - sq)
                eta = self.lr
            self.m[key], self.v[key] = m, v
            out[key] = _cast_like(x + eta * m / (np.sqrt(v) + self.tau), cur)
        return out

    def state_arrays(self) -> Arrays:
        """The optimizer state as flat arrays (``m/<key>``, ``v/<key>``, ``steps``)."""
        state: Arrays = {"steps": np.asarray([self.steps], dtype=np.int64)}
        state.update({f"m/{k}": v for k, v in self.m.items()})
        state.update({f"v/{k}": v for k, v in self.v.items()})
        return state

    def load_state_arrays(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_arrays` returned."""
        self.steps = int(state["steps"][0]) if "steps" in state else 0
        self.m = {k[2:]: np.asarray(v, np.float64) for k, v in state.items() if k[:2] == "m/"}
        self.v = {k[2:]: np.asarray(v, np.float64) for k, v in state.items() if k[:2] == "v/"}


class Aggregator:
    """The configured aggregation rule, with its state.

    Example:
        >>> import numpy as np
        >>> agg = Aggregator(RunSettings(strategy="fedmedian"))
        >>> ups = [SiteUpdate(s, {"w": np.array([x])}, 1, {}) for s, x in
        ...        [("A", 1.0), ("B", 2.0), ("C", 9.0)]]
        >>> agg.aggregate({"w": np.array([0.0])}, ups)["w"].tolist()
        [2.0]
    """

    def __init__(self, settings: RunSettings, *, controls: Arrays | None = None) -> None:
        self.settings = settings
        self._warned_untrimmed: set[int] = set()
        self.control: Arrays = dict(controls or {})  # SCAFFOLD's server control variate
        self.optimizer: ServerOptimizer | None = None
        if settings.strategy in ("fedadam", "fedyogi"):
            self.optimizer = ServerOptimizer(
                kind=settings.strategy,
                lr=settings.server_lr,
                beta1=settings.server_beta1,
                beta2=settings.server_beta2,
                tau=settings.server_tau,
            )

    def aggregate(self, current: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]) -> Arrays:
        """Return the next global arrays (same keys, shapes and dtypes as ``current``; batch-norm
        variances, which site-level DP noise may push below zero, clamped at zero)."""
        return {
            k: np.maximum(v, 0).astype(v.dtype) if k.endswith("running_var") else v
            for k, v in self._aggregate(current, updates).items()
        }

    def _aggregate(
        self, current: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]
    ) -> Arrays:
        arrays_list = [u.arrays for u in updates]
        strategy = self.settings.strategy
        if strategy == "fedmedian":
            return coordinate_median(arrays_list)
        if strategy == "trimmed-mean":
            n, fraction = len(arrays_list), self.settings.trim_fraction
            if int(fraction * n) == 0 and n not in self._warned_untrimmed:
                self._warned_untrimmed.add(n)
                logger.warning(
                    "trimmed-mean with trim-fraction %g trims nothing at %d sites (it cuts "
                    "int(%g x %d) = 0 values at each end): this round is a plain mean; raise "
                    "trim-fraction to at least %.3g or sample more sites",
                    fraction,
                    n,
                    fraction,
                    n,
                    1.0 / n,
                )
            return trimmed_mean(arrays_list, trim_fraction=fraction)
        averaged = weighted_average(arrays_list, [u.num_examples for u in updates])
        if self.optimizer is not None:
            return self.optimizer.step(current, averaged)
        return averaged

    def update_control(self, updates: Sequence[SiteUpdate], *, num_sites: int) -> None:
        """SCAFFOLD: move the server control variate by the sites' control changes."""
        if self.control:
            deltas = [u.controls for u in updates]
            self.control = update_server_control(self.control, deltas, num_sites=num_sites)

    def state_arrays(self) -> Arrays:
        """Server-side state to checkpoint (empty for stateless rules)."""
        state = self.optimizer.state_arrays() if self.optimizer is not None else {}
        state.update({f"c/{k}": v for k, v in self.control.items()})
        return state

    def load_state_arrays(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore state saved by :meth:`state_arrays`."""
        if self.optimizer is not None:
            self.optimizer.load_state_arrays(state)
        if self.control:
            for key in self.control:
                if f"c/{key}" in state:
                    self.control[key] = np.asarray(state[f"c/{key}"], np.float32)
