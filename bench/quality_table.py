"""The quality benchmark's results: one JSON per (method, seed), and the table built from them.

``bench/quality.py`` writes ``<results>/<method>-seed<S>.json`` after each run (format
:data:`FORMAT`)::

    {"format": "fedmed-quality-1", "method": "fedavg", "seed": 3, "protocol": "9f2c...",
     "holdout": {"dice": {"n": 16, "mean": 0.81, "ci_low": 0.77, "ci_high": 0.84, ...}},
     "sites": {"site-A": {"dice": {...}}, ...}, "models": {"holdout": "global-final",
     "site-A": "global-final"}, ...}

Every figure is one model's summary from the run's ``cross_site.json`` (a model that exists:
the global model, the centralized one, or a site's own fine-tuned, Ditto or local-only model on
its own validation split), never an average of several models' scores. :func:`build_table`
aggregates whatever JSONs exist: for each method and column the mean and standard deviation
over seeds, the 95 % interval of that mean (Student t over seeds) and the mean of the per-seed
bootstrap intervals over cases. So the table may be filled over several sessions.

Example:
    >>> table = build_table(load_results("bench/results/quality/protocol"))
    >>> print(format_table(table))
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT",
    "GLOBAL_METHODS",
    "METHODS",
    "PERSONAL_METHODS",
    "Cell",
    "build_table",
    "format_table",
    "goals",
    "load_results",
    "result_path",
    "seed_spread",
]

FORMAT = "fedmed-quality-1"
# methods whose figures are one model for the whole federation (held-out column)
GLOBAL_METHODS = ("centralized", "fedavg", "fedprox", "fedbn", "scaffold")
# methods whose figures are each site's own model on its own validation split
PERSONAL_METHODS = ("local-only", "fine-tuned", "ditto")
METHODS = ("centralized", "local-only", "fedavg", "fedprox", "fedbn", "scaffold", "ditto",
           "fine-tuned")  # fmt: skip
HOLDOUT = "holdout"
# Student t quantiles (0.975) by degrees of freedom; beyond 10 the normal's 1.96 is close
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}  # fmt: skip

Cell = dict[str, Any]


def result_path(results: str | Path, method: str, seed: int) -> Path:
    """Where the result of ``method`` with training seed ``seed`` is kept."""
    return Path(results) / f"{method}-seed{seed}.json"


def load_results(results: str | Path, *, protocol: str | None = None) -> list[dict[str, Any]]:
    """Every result JSON in ``results`` (of ``protocol`` when given), sorted by method, seed.

    A file of another format or protocol is skipped; an unreadable one is a ValueError naming
    it (a half-written result never exists: results are written to a temporary file first).
    """
    out = []
    for path in sorted(Path(results).glob("*-seed*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a quality result ({err}): delete it and rerun") from err
        if doc.get("format") != FORMAT or (protocol and doc.get("protocol") != protocol):
            continue
        out.append(doc)
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(out, key=lambda d: (order.get(d["method"], len(order)), d["method"], d["seed"]))


def _mean_of(entry: Mapping[str, Any] | None, key: str) -> float | None:
    if not entry or entry.get("status", "ok") != "ok":
        return None
    value = entry.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _cell(entries: Sequence[Mapping[str, Any] | None]) -> Cell | None:
    """Mean, std, t-interval over seeds and mean case-bootstrap interval of ``entries``."""
    pairs = [(e, _mean_of(e, "mean")) for e in entries]
    values = [v for _, v in pairs if v is not None]
    if not values:
        return None
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else None
    half = _T975.get(n - 1, 1.96) * std / math.sqrt(n) if std is not None else None
    lows = [_mean_of(e, "ci_low") for e, v in pairs if v is not None]
    highs = [_mean_of(e, "ci_high") for e, v in pairs if v is not None]
    cases = [e.get("n") for e, v in pairs if v is not None and e is not None]
    return {
        "seeds": n,
        "mean": mean,
        "std": std,
        "seed_ci": None if half is None else [mean - half, mean + half],
        "case_ci": (
            [statistics.fmean(lows), statistics.fmean(highs)]  # type: ignore[arg-type]
            if all(x is not None for x in (*lows, *highs))
            else None
        ),
        "cases": min(c for c in cases if isinstance(c, int)) if cases else None,
        "values": values,
    }


def build_table(results: Iterable[Mapping[str, Any]], *, metric: str = "dice") -> dict[str, Any]:
    """``{"columns": [...], "rows": {method: {column: cell}}}`` over the results given.

    Columns are ``holdout`` and every site seen; a cell aggregates the seeds that have the
    entry (its ``seeds`` count says how many).
    """
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    sites: set[str] = set()
    for doc in results:
        by_method.setdefault(doc["method"], []).append(doc)
        sites.update(doc.get("sites", {}))
    columns = [HOLDOUT, *sorted(sites)]
    rows: dict[str, dict[str, Cell | None]] = {}
    for method, docs in by_method.items():
        row: dict[str, Cell | None] = {}
        for column in columns:
            source = [
                (d.get("holdout") if column == HOLDOUT else d.get("sites", {}).get(column)) or {}
                for d in docs
            ]
            row[column] = _cell([s.get(metric) for s in source])
        row["_seeds"] = {"seeds": sorted(d["seed"] for d in docs)}
        rows[method] = row
    return {"metric": metric, "columns": columns, "rows": rows}


def _points(cell: Cell | None) -> float | None:
    return None if cell is None else 100.0 * cell["mean"]


def _gap(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def goals(table: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's figures: std over seeds of FedAvg and centralized (required <= 3 points),
    the best global method and FedAvg vs centralized on the held-out set (goals: within 2 and
    3 points), and per site whether a personalized model is at least as good as local-only."""
    rows = table["rows"]

    def cell(method: str, column: str = HOLDOUT) -> Cell | None:
        return rows.get(method, {}).get(column)

    out: dict[str, Any] = {"std-points": {}}
    for method in ("fedavg", "centralized"):
        std = (cell(method) or {}).get("std")
        out["std-points"][method] = None if std is None else round(100.0 * std, 2)
    stds = out["std-points"].values()
    out["std-within-3-points"] = all(v is not None and v <= 3.0 for v in stds)
    central = _points(cell("centralized"))
    federated = {m: _points(cell(m)) for m in GLOBAL_METHODS[1:] if cell(m) is not None}
    if central is not None and federated:
        best = max(federated, key=lambda m: federated[m] or 0.0)
        out["best-method"] = best
        out["best-minus-centralized-points"] = _gap(federated[best], central)
        out["best-within-2-points"] = out["best-minus-centralized-points"] >= -2.0
    fedavg = _gap(federated.get("fedavg"), central)
    if fedavg is not None:
        out["fedavg-minus-centralized-points"] = fedavg
        out["fedavg-within-3-points"] = fedavg >= -3.0
    per_site = {
        site: {
            m: _gap(_points(cell(m, site)), _points(cell("local-only", site)))
            for m in ("fine-tuned", "ditto")
        }
        for site in table["columns"]
        if site != HOLDOUT
    }
    out["personalized-minus-local-only-points"] = per_site
    best_by_site = [
        max((v for v in d.values() if v is not None), default=None) for d in per_site.values()
    ]
    out["personalized-at-least-local-only"] = (
        all(v >= 0 for v in best_by_site) if best_by_site and None not in best_by_site else None
    )
    return out


def _fmt(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    text = f"{cell['mean']:.3f}"
    if cell["std"] is not None:
        text += f" ± {cell['std']:.3f}"
    return text


def format_table(table: Mapping[str, Any]) -> str:
    """The FLamby-style Markdown table: a row per method, a column per test set; each cell
    mean ± std over seeds; the held-out column adds the t-interval over seeds and the mean
    bootstrap interval over cases."""
    columns = table["columns"]
    sites = [c for c in columns if c != HOLDOUT]
    head = ["method", "seeds", "held-out Dice", "95% CI (seeds)", "95% CI (cases)"]
    head += [f"val {s}" for s in sites]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method, row in table["rows"].items():
        held = row.get(HOLDOUT)
        seeds = row["_seeds"]["seeds"]
        ci = held and held["seed_ci"]
        cases = held and held["case_ci"]
        label = f"{method} (own site)" if method in PERSONAL_METHODS else method
        cells = [
            label,
            str(len(seeds)),
            _fmt(held),
            f"{ci[0]:.3f} - {ci[1]:.3f}" if ci else "-",
            f"{cases[0]:.3f} - {cases[1]:.3f}" if cases else "-",
            *(_fmt(row.get(s)) for s in sites),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of the values present, and each seed's value
    (None where a run gave none), rounded to 4 places; for the other benches' one-line tables.

    Example:
        >>> seed_spread([0.5, None, 0.7])["mean"]
        0.6
    """
    present = [v for v in values if v is not None]
    return {
        "mean": round(statistics.fmean(present), 4) if present else None,
        "std": round(statistics.stdev(present), 4) if len(present) > 1 else None,
        "per-seed": [None if v is None else round(v, 4) for v in values],
    }
