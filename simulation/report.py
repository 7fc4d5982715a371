"""One report comparing simulated runs (strategies) and the centralized baseline.

Reads each run's ``metrics.jsonl`` records (:class:`fedmed.server.report.MetricsLog` format) and
writes ``<out>/report.md`` with ``compare_holdout.png`` (held-out Dice per round, one line per
run, the centralized line dashed), ``compare_sites.png`` (each site's validation Dice after the
last round, grouped by run) and a table; :func:`summarize` gives the same figures as a dict
(also written to ``summary.json``).

Example:
    >>> write_comparison("run", {"fedavg": fedavg_records}, centralized=central_records)
    PosixPath('run/report.md')
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fedmed.server.report import json_safe
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["summarize", "write_comparison"]

Records = Sequence[Mapping[str, Any]]
CENTRALIZED = "centralized"


def _holdout_series(records: Records) -> list[tuple[int, float]]:
    return [
        (int(r["round"]), float(r["holdout"]["dice"]))
        for r in records
        if r.get("status") in ("ok", "initial")
        and r.get("holdout")
        and r["holdout"].get("dice") is not None
    ]


def summarize(records: Records) -> dict[str, Any]:
    """Final and best held-out Dice, each site's last validation Dice (against the clean labels
    too at a demo site with noisy labels) and loss, round times."""
    done = [r for r in records if r.get("status") == "ok"]
    series = _holdout_series(records)
    last = done[-1] if done else {}
    durations = [float(r["duration-s"]) for r in done if r.get("duration-s") is not None]
    return {
        "rounds": len(done),
        "failed-attempts": sum(1 for r in records if r.get("status") == "failed"),
        "final-holdout-dice": series[-1][1] if series else None,
        "best-holdout-dice": max((d for _, d in series), default=None),
        "site-val-dice": {
            s: m.get("val-dice") for s, m in sorted((last.get("sites") or {}).items())
        },
        "site-val-dice-clean": {  # demo sites with noisy labels: Dice against the clean ones
            s: m["val-dice-clean"]
            for s, m in sorted((last.get("sites") or {}).items())
            if m.get("val-dice-clean") is not None
        },
        "site-train-loss": {
            s: m.get("train-loss") for s, m in sorted((last.get("sites") or {}).items())
        },
        "mean-round-s": float(np.mean(durations)) if durations else None,
    }


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=(7, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _plot_holdout(path: Path, runs: Mapping[str, Records], centralized: Records | None) -> None:
    fig, ax = _figure()
    for name, records in runs.items():
        points = _holdout_series(records)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
    if centralized:
        points = _holdout_series(centralized)
        if points:
            ax.plot(*zip(*points, strict=True), "k--", marker="s", label=CENTRALIZED)
    ax.set_title("held-out Dice of the global model")
    ax.set_xlabel("round")
    ax.set_ylabel("Dice")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def _plot_sites(path: Path, summaries: Mapping[str, Mapping[str, Any]]) -> None:
    fig, ax = _figure()
    sites = sorted({s for summary in summaries.values() for s in summary["site-val-dice"]})
    width = 0.8 / max(1, len(summaries))
    for i, (name, summary) in enumerate(summaries.items()):
        values = [summary["site-val-dice"].get(s) for s in sites]
        heights = [v if v is not None else 0.0 for v in values]
        xs = np.arange(len(sites)) + i * width - 0.4 + width / 2
        ax.bar(xs, heights, width=width, label=name)
    ax.set_xticks(np.arange(len(sites)))
    ax.set_xticklabels(sites, fontsize="small")
    ax.set_title("validation Dice at each site after the last round")
    ax.set_ylabel("Dice")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, axis="y", alpha=0.3)
    if summaries:
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def write_comparison(
    out_dir: str | os.PathLike[str],
    runs: Mapping[str, Records],
    *,
    centralized: Records | None = None,
    settings: Mapping[str, Any] | None = None,
    links: Mapping[str, str] | None = None,
) -> Path:
    """Write ``report.md``, both plots and ``summary.json`` into ``out_dir``; return the report.

    ``links`` maps a run name to its own report (relative path) for the table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {name: summarize(records) for name, records in runs.items()}
    central = summarize(centralized) if centralized else None
    _plot_holdout(out / "compare_holdout.png", runs, centralized)
    _plot_sites(out / "compare_sites.png", summaries)
    lines = ["# fedmed-sim report", ""]
    if central and central["final-holdout-dice"] is not None:
        lines.append(
            f"Centralized training (pooled training data, same epochs/steps): final held-out "
            f"Dice {central['final-holdout-dice']:.4f}."
        )
    lines += ["", "![held-out Dice](compare_holdout.png)", "", "![site Dice](compare_sites.png)"]
    sites = sorted({s for summary in summaries.values() for s in summary["site-val-dice"]})
    header = ["run", "rounds", "final held-out Dice", "best held-out Dice", "gap to centralized"]
    header += [f"{s} val Dice" for s in sites] + ["s / round"]
    lines += ["", "## Runs", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + " --- |" * len(header))
    rows = list(summaries.items()) + ([(CENTRALIZED, central)] if central else [])
    for name, summary in rows:
        final = summary["final-holdout-dice"]
        gap = None
        if central and central["final-holdout-dice"] is not None and final is not None:
            gap = final - central["final-holdout-dice"]
        label = f"[{name}]({links[name]})" if links and name in links else name
        cells = [label, str(summary["rounds"]), _fmt(final), _fmt(summary["best-holdout-dice"])]
        cells.append("-" if gap is None or name == CENTRALIZED else f"{gap:+.4f}")
        clean = summary.get("site-val-dice-clean") or {}
        cells += [
            _fmt(summary["site-val-dice"].get(s))
            + (f" (clean labels {_fmt(clean[s])})" if s in clean else "")
            for s in sites
        ]
        cells.append(_fmt(summary["mean-round-s"]))
        lines.append("| " + " | ".join(cells) + " |")
    if settings:
        lines += ["", "## Settings", "", "| key | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(settings.items())]
    summary_blob = {"runs": summaries, CENTRALIZED: central}
    (out / "summary.json").write_text(
        json.dumps(json_safe(summary_blob), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    path = out / "report.md"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".report.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
