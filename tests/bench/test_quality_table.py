"""bench/quality_table.py: the quality table built from crafted per-(method, seed) results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


qt = _load("quality_table")


def _entry(mean: float, n: int = 8) -> dict:
    return {"n": n, "status": "ok", "mean": mean, "ci_low": mean - 0.05, "ci_high": mean + 0.05}


def _write(root: Path, method: str, seed: int, holdout: float | None, sites: dict, **extra):
    doc = {
        "format": qt.FORMAT,
        "method": method,
        "seed": seed,
        "protocol": extra.pop("protocol", "p1"),
        "holdout": None if holdout is None else {"dice": _entry(holdout, 16)},
        "sites": {s: {"dice": _entry(v)} for s, v in sites.items()},
        **extra,
    }
    qt.result_path(root, method, seed).write_text(json.dumps(doc), encoding="utf-8")


@pytest.fixture
def results(tmp_path: Path) -> Path:
    for seed, (c, f) in enumerate([(0.80, 0.78), (0.82, 0.77), (0.84, 0.79)]):
        _write(tmp_path, "centralized", seed, c, {"A": 0.7, "B": 0.6})
        _write(tmp_path, "fedavg", seed, f, {"A": 0.72, "B": 0.58})
    _write(tmp_path, "local-only", 0, None, {"A": 0.65, "B": 0.62})
    _write(tmp_path, "ditto", 0, None, {"A": 0.70, "B": 0.61})
    _write(tmp_path, "fine-tuned", 0, None, {"A": 0.66, "B": 0.63})
    _write(tmp_path, "fedavg", 9, 0.10, {"A": 0.1}, protocol="other")  # another protocol
    return tmp_path


def test_cells_are_mean_and_std_over_seeds_of_one_protocol(results):
    table = qt.build_table(qt.load_results(results, protocol="p1"))
    assert table["columns"] == ["holdout", "A", "B"]
    fedavg = table["rows"]["fedavg"]["holdout"]
    assert fedavg["seeds"] == 3 and fedavg["mean"] == pytest.approx(0.78)
    assert fedavg["std"] == pytest.approx(0.01)
    # t interval over 3 seeds: 4.303 * 0.01 / sqrt(3); case interval: mean of the bootstrap ones
    assert fedavg["seed_ci"] == pytest.approx([0.78 - 0.024843, 0.78 + 0.024843], abs=1e-6)
    assert fedavg["case_ci"] == pytest.approx([0.73, 0.83])
    assert table["rows"]["ditto"]["holdout"] is None
    assert table["rows"]["ditto"]["A"]["std"] is None  # one seed: no spread claimed
    assert list(table["rows"]) == ["centralized", "local-only", "fedavg", "ditto", "fine-tuned"]


def test_goals_compare_with_centralized_and_local_only(results):
    out = qt.goals(qt.build_table(qt.load_results(results, protocol="p1")))
    assert out["std-points"] == {"fedavg": 1.0, "centralized": 2.0}
    assert out["std-within-3-points"] is True
    assert out["fedavg-minus-centralized-points"] == pytest.approx(-4.0)
    assert out["fedavg-within-3-points"] is False
    assert out["best-method"] == "fedavg" and out["best-within-2-points"] is False
    # site A: ditto +5, fine-tuned +1; site B: ditto -1, fine-tuned +1 -> each site has one
    assert out["personalized-minus-local-only-points"]["B"] == {"fine-tuned": 1.0, "ditto": -1.0}
    assert out["personalized-at-least-local-only"] is True


def test_a_missing_or_withheld_entry_leaves_the_cell_to_the_other_seeds(tmp_path):
    _write(tmp_path, "fedavg", 0, 0.8, {"A": 0.5})
    _write(tmp_path, "fedavg", 1, 0.7, {})
    withheld = {"n": 2, "status": "too few cases"}
    doc = json.loads(qt.result_path(tmp_path, "fedavg", 1).read_text())
    doc["sites"] = {"A": {"dice": withheld}}
    qt.result_path(tmp_path, "fedavg", 1).write_text(json.dumps(doc))
    table = qt.build_table(qt.load_results(tmp_path))
    assert table["rows"]["fedavg"]["A"]["seeds"] == 1
    assert table["rows"]["fedavg"]["holdout"]["seeds"] == 2
    goals = qt.goals(table)
    assert goals["std-within-3-points"] is False  # no centralized figures: not shown
    assert goals["personalized-at-least-local-only"] is None


def test_format_table_prints_a_row_per_method(results):
    text = qt.format_table(qt.build_table(qt.load_results(results, protocol="p1")))
    lines = text.splitlines()
    assert lines[0].startswith("| method | seeds | held-out Dice")
    assert "| fedavg | 3 | 0.780 ± 0.010 | 0.755 - 0.805 | 0.730 - 0.830 |" in text
    assert any(line.startswith("| ditto (own site) | 1 | - |") for line in lines)


def test_an_unreadable_result_names_the_file(tmp_path):
    qt.result_path(tmp_path, "fedavg", 0).write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match=r"fedavg-seed0.json: not a quality result"):
        qt.load_results(tmp_path)
