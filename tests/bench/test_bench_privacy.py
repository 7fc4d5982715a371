"""bench/privacy.py's pieces that decide its figures: the noise calibration, the privacy checks
of each site's record and the table (the benchmark itself is run by hand)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from fedmed.security.accountant import record_epsilon
from fedmed.siteround import num_patients
from fedmed.task import SiteTask

_PATH = Path(__file__).parents[2] / "bench" / "privacy.py"
_SPEC = importlib.util.spec_from_file_location("bench_privacy", _PATH)
assert _SPEC and _SPEC.loader
privacy = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_privacy"] = privacy
_SPEC.loader.exec_module(privacy)


@pytest.mark.parametrize(
    ("target", "rate", "steps"), [(1.0, 0.33, 150), (3.0, 0.08, 250), (8.0, 0.5, 20)]
)
def test_calibrated_noise_is_the_smallest_that_meets_the_target(target, rate, steps):
    sigma = privacy.calibrate_noise(target, sample_rate=rate, steps=steps, delta=1e-5)

    def eps(s: float) -> float:
        return record_epsilon(sample_rate=rate, noise_multiplier=s, steps=steps, delta=1e-5)

    assert eps(sigma) <= target  # within the target ...
    assert eps(sigma * 0.995) > target  # ... and no more noise than it needs
    assert eps(sigma) > 0.99 * target


def test_more_epsilon_needs_less_noise_and_a_bad_target_is_refused():
    sigmas = [privacy.calibrate_noise(e, sample_rate=0.1, steps=100, delta=1e-5) for e in (1, 3, 8)]
    assert sigmas == sorted(sigmas, reverse=True)
    with pytest.raises(ValueError, match="target epsilon"):
        privacy.calibrate_noise(0.0, sample_rate=0.1, steps=100, delta=1e-5)


def test_the_cross_check_agrees_with_fedmeds_accountant():
    args = {"sample_rate": 0.2, "noise_multiplier": 1.3, "steps": 60, "delta": 1e-5}
    assert privacy.rdp_epsilon(**args) == pytest.approx(record_epsilon(**args), rel=1e-9)
    full = {**args, "sample_rate": 1.0}  # every patient in every step: no subsampling event
    assert privacy.rdp_epsilon(**full) == pytest.approx(record_epsilon(**full), rel=1e-9)


def _site(epsilon_total: float | None = None, **override: float) -> dict[str, float]:
    record = {"dp-sample-rate": 0.25, "dp-noise-multiplier": 1.5, "dp-steps": 40, "dp-delta": 1e-5}
    record.update(override)
    eps = privacy.rdp_epsilon(
        sample_rate=record["dp-sample-rate"],
        noise_multiplier=record["dp-noise-multiplier"],
        steps=int(record["dp-steps"]),
        delta=record["dp-delta"],
    )
    record["dp-epsilon"] = eps
    record["dp-epsilon-total"] = eps if epsilon_total is None else epsilon_total
    return record


def test_site_records_are_checked_against_the_target_and_recomputed():
    eps = _site()["dp-epsilon"]
    checked = privacy.check_dp_sites(
        {"site-A": _site()}, target=eps, steps=40, rates={"site-A": 0.25}
    )
    assert checked["site-A"]["epsilon-recomputed"] == pytest.approx(eps)
    with pytest.raises(AssertionError, match="site-A: dp-epsilon-total"):
        privacy.check_dp_sites(
            {"site-A": _site(epsilon_total=1.02 * eps)}, target=eps, steps=40,
            rates={"site-A": 0.25},
        )  # fmt: skip
    wrong = {**_site(), "dp-epsilon": 0.5 * eps}  # reported epsilon not what its parameters give
    with pytest.raises(AssertionError, match="site-A"):
        privacy.check_dp_sites({"site-A": wrong}, target=eps, steps=40, rates={"site-A": 0.25})
    with pytest.raises(AssertionError, match="40 DP-SGD steps, planned 50"):
        privacy.check_dp_sites({"site-A": _site()}, target=eps, steps=50, rates={"site-A": 0.25})


def _result(label: str, seed: int, dice: float, sigma: float = 2.0) -> dict:
    out = {"label": label, "seed": seed, "holdout-dice": dice}
    if label != "nonprivate":
        out.update(
            {
                "target-epsilon": float(label.split("-")[1]),
                "noise-multiplier": sigma,
                "dp-steps": 150,
                "dp-sites": {
                    "site-A": {
                        "sample-rate": 0.33,
                        "epsilon-total": 0.99,
                        "epsilon-recomputed": 0.99,
                    },
                    "site-B": {
                        "sample-rate": 0.32,
                        "epsilon-total": 0.95,
                        "epsilon-recomputed": 0.95,
                    },
                },
            }
        )
    return out


def test_the_table_gives_mean_std_and_the_drop_against_non_private_in_points():
    results = [
        _result("eps-8", 0, 0.45, sigma=1.0),
        _result("nonprivate", 1, 0.6),
        _result("eps-1", 0, 0.2, sigma=2.5),
        _result("nonprivate", 0, 0.5),
        _result("eps-1", 1, 0.3, sigma=2.6),
    ]
    rows = privacy.summarize(results)
    assert list(rows) == ["nonprivate", "eps-1", "eps-8"]
    assert rows["nonprivate"]["dice-mean"] == pytest.approx(0.55)
    assert rows["nonprivate"]["seeds"] == [0, 1] and rows["nonprivate"]["n"] == 2
    one = rows["eps-1"]
    assert one["dice-mean"] == pytest.approx(0.25)
    assert one["dice-std"] == pytest.approx(math.sqrt(0.005))  # sample std of 0.2, 0.3
    assert one["minus-nonprivate-points"] == pytest.approx(-30.0)
    assert one["ratio"] == pytest.approx(0.25 / 0.55)
    assert one["noise-multiplier"] == [2.5, 2.6] and one["sample-rate"] == 0.33
    assert one["max-epsilon-total"] == 0.99
    assert rows["eps-8"]["dice-std"] is None  # one seed: no spread to report
    lines = privacy.table_lines(rows)
    assert len(lines) == 4 and "held-out Dice" in lines[0]
    assert "0.550 +- 0.071" in lines[1]
    assert "2.500-2.600" in lines[2] and "-30.0" in lines[2] and "0.250 +- 0.071" in lines[2]
    assert "0.450 +- -" in lines[3] and "-10.0" in lines[3]


def test_training_patients_is_the_sites_own_dp_sgd_denominator(demo_root):
    site = demo_root / "site-A"
    task = SiteTask(site, val_fraction=0.2, seed=3)
    assert privacy.training_patients(site, val_fraction=0.2, seed=3) == num_patients(task) >= 1
