"""What a site may disclose about a set of per-case values: n, mean, interval, worst decile.

Per-case values stay at the site (DESIGN.md section 10); what leaves it is, per metric, the
number of cases, the mean, a bootstrap 95% interval and the mean of the worst decile, and only
when the number of cases reaches the site's disclosure floor (default 5): below it the entry
says ``"too few cases"`` and carries no value computed from the cases.

- Interval: the percentile bootstrap of the mean (Efron), ``n_boot`` resamples of the n cases
  with replacement, seeded and deterministic; it reflects case-to-case variation at this site,
  not training-seed variation.
- Worst decile: the mean of the worst ``ceil(n / 10)`` cases (at least one); worst is lowest
  for Dice/NSD (``higher_is_better=True``) and highest for HD95/volume error.
- Undefined values (nan: a both-empty case's HD95, a spurious case's volume error) are never
  dropped silently: the caller passes the defined values and their count as ``n_undefined``,
  which the entry reports; :func:`summarize_cases` does this for task records.

Example:
    >>> summarize_values([0.8, 0.7, 0.9, 0.6, 0.85], higher_is_better=True)
    {'n': 5, 'n_undefined': 0, 'status': 'ok', 'mean': 0.77, 'ci_low': 0.67, 'ci_high': 0.86,
     'worst_decile': 0.6}
    >>> summarize_values([0.8, 0.7], higher_is_better=True)
    {'n': 2, 'n_undefined': 0, 'status': 'too few cases'}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CASE_METRICS",
    "DEFAULT_DISCLOSURE_FLOOR",
    "TOO_FEW_CASES",
    "summarize_cases",
    "summarize_values",
]

DEFAULT_DISCLOSURE_FLOOR = 5
"""Fewest cases a site discloses a summary of (a site setting)."""

TOO_FEW_CASES = "too few cases"
"""The ``status`` of an entry below the disclosure floor."""

CASE_METRICS: Mapping[str, bool] = {"dice": True, "hd95": False, "nsd": True, "abs_rve": False}
"""Metrics :func:`summarize_cases` reports by default, each with ``higher_is_better``;
``abs_rve`` is the absolute relative volume error, ``|rve|``."""

_BOOT_CHUNK = 1_000_000  # resampled values held at once (memory bound for large sites)


def summarize_values(
    values: Sequence[float] | np.ndarray,
    *,
    higher_is_better: bool,
    floor: int = DEFAULT_DISCLOSURE_FLOOR,
    n_boot: int = 1000,
    seed: int = 0,
    n_undefined: int = 0,
) -> dict[str, Any]:
    """The disclosable summary of one metric's defined per-case ``values``.

    Returns ``n``, ``n_undefined``, ``status`` and, when ``n >= floor`` (status ``"ok"``),
    ``mean``, ``ci_low``, ``ci_high`` (bootstrap 95% percentile interval of the mean) and
    ``worst_decile``; below the floor status is ``"too few cases"`` and nothing else is given.
    Raises ValueError on nan/inf values (pass undefined ones as ``n_undefined``) or bad options.

    Example:
        >>> summarize_values(hd95_values, higher_is_better=False, floor=5, seed=0)["ci_high"]
    """
    if floor < 1:
        raise ValueError(f"floor must be >= 1 case, got {floor}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if n_undefined < 0:
        raise ValueError(f"n_undefined must be >= 0, got {n_undefined}")
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(data).all():
        raise ValueError(
            f"values hold {int((~np.isfinite(data)).sum())} nan/inf: pass only defined values "
            "and their count as n_undefined"
        )
    n = int(data.size)
    entry: dict[str, Any] = {"n": n, "n_undefined": int(n_undefined)}
    if n < floor:
        entry["status"] = TOO_FEW_CASES
        return entry
    low, high = _bootstrap_interval(data, n_boot=n_boot, seed=seed)
    k = max(1, -(-n // 10))  # ceil(n / 10) in integers: 0.1 * 30 is 3.0000000000000004
    ordered = np.sort(data)
    worst = ordered[:k] if higher_is_better else ordered[-k:]
    entry.update(
        status="ok",
        mean=float(data.mean()),
        ci_low=low,
        ci_high=high,
        worst_decile=float(worst.mean()),
    )
    return entry


def _bootstrap_interval(data: np.ndarray, *, n_boot: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = data.size
    rows = max(1, _BOOT_CHUNK // n)
    means = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        means[start:stop] = data[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarize_cases(
    cases: Sequence[Mapping[str, Any]],
    *,
    metrics: Mapping[str, bool] = CASE_METRICS,
    floor: int = DEFAULT_DISCLOSURE_FLOOR,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """One :func:`summarize_values` entry per metric of per-case records (task.py's ``cases``).

    ``metrics`` maps a record key to ``higher_is_better``; ``abs_<key>`` takes ``|key|``
    (``abs_rve``), per-class keys work too (``{"dice_1": True}``). A nan value, or a record
    without the key, counts in ``n_undefined``.

    Example:
        >>> summarize_cases(evaluate_model(model, volumes, cfg)["cases"])["dice"]["mean"]
    """
    out: dict[str, dict[str, Any]] = {}
    for name, higher in metrics.items():
        key = name.removeprefix("abs_")
        raw = [float(c[key]) if key in c else math.nan for c in cases]
        defined = [abs(v) if key != name else v for v in raw if not math.isnan(v)]
        out[name] = summarize_values(
            defined,
            higher_is_better=higher,
            floor=floor,
            n_boot=n_boot,
            seed=seed,
            n_undefined=len(raw) - len(defined),
        )
    return out
