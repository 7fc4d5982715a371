"""Per-case metrics reduced: one case over its classes, and a set of cases into a summary.

:func:`combine_classes` turns one case's per-class record (:func:`fedmed.metrics.evaluate_case`)
into means over the classes where each metric is defined and counts of the flagged classes;
:func:`summarize` gives each metric's mean over the cases where it is defined, with that
number of cases, and the flag counts, so an undefined value (a both-empty surface, the volume
error of a spurious case) is counted apart, never silently dropped (Metrics Reloaded). What a
site may disclose of such values is :mod:`fedmed.stats`.

Example:
    >>> per_case = [combine_classes(evaluate_case(pred, label, num_classes=3), [1, 2])]
    >>> summary = summarize(per_case)
    >>> summary["dice"], summary["dice_n"], summary["n_missed"]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from fedmed.metrics import FLAGS, METRICS

__all__ = ["combine_classes", "summarize"]

_FLAG_KEY = re.compile(r"^(missed|spurious|both_empty)(_\d+)?$")


def combine_classes(
    case: Mapping[str, float | bool], classes: Sequence[int], *, keep_classes: bool = False
) -> dict[str, float | int | bool]:
    """One case's record over ``classes``: each metric's mean over the classes where it is
    defined (nan if none), and ``missed``/``spurious``/``both_empty`` as the number of classes
    so flagged; ``keep_classes`` keeps the per-class keys too.

    Example:
        >>> combine_classes(evaluate_case(pred, label, num_classes=3), [1, 2])["missed"]
        1
    """
    out: dict[str, float | int | bool] = {}
    for name in METRICS:
        values = [float(case[f"{name}_{c}"]) for c in classes]
        defined = [v for v in values if not math.isnan(v)]
        out[name] = float(np.mean(defined)) if defined else math.nan
    for flag in FLAGS:
        out[flag] = sum(int(bool(case[f"{flag}_{c}"])) for c in classes)
    if keep_classes:
        out.update({f"{n}_{c}": case[f"{n}_{c}"] for n in (*METRICS, *FLAGS) for c in classes})
    return out


def summarize(per_case: Sequence[Mapping[str, object]]) -> dict[str, float | int]:
    """Means of the metrics over cases, each with its count, and the flag counts.

    For every numeric key ``k`` that is not a flag: ``k`` the mean over the cases where it
    is defined (nan if none) and ``k_n`` that number of cases; undefined values are
    both-empty surfaces and RVE of spurious cases, so ``n_cases - k_n`` is explained
    by the flag counts. For every flag key ``f`` (``missed``, ``missed_1``, ...):
    ``n_f`` the number of cases where it is set (a count where it counts classes). Always:
    ``n_cases``, and ``n_missed``, ``n_spurious``, ``n_both_empty`` counting (case, class)
    pairs. Non-numeric values (the case id) are skipped.

    Example:
        >>> summarize([{"dice_1": 0.8, "missed_1": False}, {"dice_1": 0.0, "missed_1": True}])
        {'dice_1': 0.4, 'dice_1_n': 2, 'n_missed_1': 1, 'n_cases': 2, 'n_missed': 1,
         'n_spurious': 0, 'n_both_empty': 0}
    """
    keys: list[str] = []
    for case in per_case:
        keys.extend(k for k in case if k not in keys)
    out: dict[str, float | int] = {}
    for key in keys:
        raw = [case[key] for case in per_case if key in case]
        if not all(isinstance(v, (int, float, np.number)) for v in raw):
            continue
        values = [float(v) for v in raw]  # type: ignore[arg-type]
        if _FLAG_KEY.match(key):
            out[f"n_{key}"] = int(sum(values))
            continue
        defined = [v for v in values if not math.isnan(v)]
        out[key] = float(np.mean(defined)) if defined else math.nan
        out[f"{key}_n"] = len(defined)
    out["n_cases"] = len(per_case)
    for flag in FLAGS:
        # a case-level count (``missed``) already counts classes; else add the per-class ones
        total = out.get(f"n_{flag}")
        if total is None:
            total = sum(v for k, v in out.items() if re.fullmatch(f"n_{flag}_\\d+", k))
        out[f"n_{flag}"] = int(total)
    return out
