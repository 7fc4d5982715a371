"""fedmed.stats: disclosable summaries (n, mean, bootstrap interval, worst decile, floor)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmed.stats import (
    CASE_METRICS,
    TOO_FEW_CASES,
    summarize_cases,
    summarize_values,
)


def _dice_like(n: int, seed: int) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).normal(0.75, 0.12, n), 0.0, 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_interval_contains_the_mean(seed: int) -> None:
    entry = summarize_values(_dice_like(40, seed), higher_is_better=True, seed=seed)
    assert entry["status"] == "ok" and entry["n"] == 40
    assert entry["ci_low"] < entry["mean"] < entry["ci_high"]


def test_interval_narrows_with_more_cases() -> None:
    widths = []
    for n in (10, 100, 1000):
        entry = summarize_values(_dice_like(n, 7), higher_is_better=True)
        widths.append(entry["ci_high"] - entry["ci_low"])
    assert widths[0] > widths[1] > widths[2] > 0
    # the percentile interval of a mean shrinks about as 1 / sqrt(n)
    assert widths[0] / widths[2] == pytest.approx(10.0, rel=0.35)


def test_interval_is_deterministic_per_seed() -> None:
    values = _dice_like(30, 3)
    a = summarize_values(values, higher_is_better=True, seed=5)
    b = summarize_values(values, higher_is_better=True, seed=5)
    c = summarize_values(values, higher_is_better=True, seed=6)
    assert a == b
    assert (a["ci_low"], a["ci_high"]) != (c["ci_low"], c["ci_high"])
    assert a["mean"] == c["mean"]


def test_interval_matches_an_independent_percentile_bootstrap() -> None:
    values = _dice_like(25, 4)
    rng = np.random.default_rng(9)
    means = [values[rng.integers(0, 25, 25)].mean() for _ in range(200)]
    entry = summarize_values(values, higher_is_better=True, n_boot=200, seed=9)
    assert entry["ci_low"] == pytest.approx(np.percentile(means, 2.5))
    assert entry["ci_high"] == pytest.approx(np.percentile(means, 97.5))


@pytest.mark.parametrize(("n", "floor"), [(0, 1), (4, 5), (2, 3)], ids=["empty", "4<5", "2<3"])
def test_below_the_floor_only_the_count_is_given(n: int, floor: int) -> None:
    entry = summarize_values([0.5] * n, higher_is_better=True, floor=floor, n_undefined=1)
    assert entry == {"n": n, "n_undefined": 1, "status": TOO_FEW_CASES}


def test_at_the_floor_the_summary_is_given() -> None:
    entry = summarize_values([0.2, 0.4, 0.6, 0.8, 1.0], higher_is_better=True, floor=5)
    assert entry["status"] == "ok" and entry["mean"] == pytest.approx(0.6)
    one = summarize_values([3.0], higher_is_better=False, floor=1)
    assert (one["mean"], one["ci_low"], one["ci_high"], one["worst_decile"]) == (3.0,) * 4


@pytest.mark.parametrize(
    ("n", "higher_is_better", "expected"),
    [
        (20, True, (1 + 2) / 2),  # ceil(20 / 10) = 2 lowest
        (20, False, (20 + 19) / 2),  # 2 highest
        (30, True, (1 + 2 + 3) / 3),  # exactly 3, not 4 (0.1 * 30 > 3 in floats)
        (25, True, (1 + 2 + 3) / 3),  # ceil(2.5) = 3
        (5, False, 5.0),  # at least one case
    ],
    ids=["20-higher", "20-lower", "30", "25", "5"],
)
def test_worst_decile_on_known_data(n: int, higher_is_better: bool, expected: float) -> None:
    values = np.random.default_rng(0).permutation(np.arange(1, n + 1, dtype=float))
    entry = summarize_values(values, higher_is_better=higher_is_better, floor=1)
    assert entry["worst_decile"] == pytest.approx(expected)


def test_nan_values_are_refused_not_dropped() -> None:
    with pytest.raises(ValueError, match="values hold 1 nan/inf: pass only defined values"):
        summarize_values([0.5, math.nan, 0.7], higher_is_better=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"floor": 0}, "floor must be >= 1"),
        ({"n_boot": 0}, "n_boot must be >= 1"),
        ({"n_undefined": -1}, "n_undefined must be >= 0"),
    ],
    ids=["floor", "n_boot", "n_undefined"],
)
def test_bad_options_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        summarize_values([1.0], higher_is_better=True, **kwargs)


def test_summarize_cases_gives_one_entry_per_metric_and_counts_undefined() -> None:
    # Prepare: 6 cases, one both-empty (hd95, nsd nan), one spurious (rve nan)
    cases = [
        {"case": f"c{i}", "dice": 0.5 + 0.1 * i, "hd95": 1.0 + i, "nsd": 0.9, "rve": -0.1 * i}
        for i in range(4)
    ]
    cases.append({"case": "empty", "dice": 1.0, "hd95": math.nan, "nsd": math.nan, "rve": 0.0})
    cases.append({"case": "spur", "dice": 0.0, "hd95": 50.0, "nsd": 0.0, "rve": math.nan})
    # Execute
    out = summarize_cases(cases, floor=5)
    # Assert
    assert set(out) == set(CASE_METRICS) == {"dice", "hd95", "nsd", "abs_rve"}
    assert (out["dice"]["n"], out["dice"]["n_undefined"]) == (6, 0)
    assert (out["hd95"]["n"], out["hd95"]["n_undefined"]) == (5, 1)
    assert out["hd95"]["mean"] == pytest.approx((1 + 2 + 3 + 4 + 50) / 5)
    assert out["hd95"]["worst_decile"] == 50.0
    assert out["abs_rve"]["mean"] == pytest.approx((0.0 + 0.1 + 0.2 + 0.3 + 0.0) / 5)
    assert out["abs_rve"]["worst_decile"] == pytest.approx(0.3)
    assert out["dice"]["worst_decile"] == 0.0
    assert summarize_cases(cases[:4], floor=5)["dice"]["status"] == TOO_FEW_CASES


def test_summarize_cases_takes_per_class_keys() -> None:
    cases = [{"dice_2": 0.5}, {"dice_2": 0.7}, {"dice_1": 0.1}]
    out = summarize_cases(cases, metrics={"dice_2": True}, floor=1)
    assert (out["dice_2"]["n"], out["dice_2"]["n_undefined"]) == (2, 1)
    assert out["dice_2"]["mean"] == pytest.approx(0.6)


def test_public_api_is_pinned() -> None:
    import fedmed.stats as module

    assert sorted(module.__all__) == [
        "CASE_METRICS",
        "DEFAULT_DISCLOSURE_FLOOR",
        "TOO_FEW_CASES",
        "summarize_cases",
        "summarize_values",
    ]
