"""The run's metrics log (``metrics.jsonl``) and its Markdown report with plots.

Each line of ``<out-dir>/metrics.jsonl`` is one round attempt::

    {"round": 2, "attempt": 1, "status": "ok" | "failed", "time": "...", "duration-s": 9.1,
     "sites": {"A": {"num-examples": 120, "train-loss": 0.41, "val-dice": 0.62}, ...},
     "rejected": {"C": "update norm 812 exceeds max-update-norm 100"},
     "missing": ["D"],
     "holdout": {"dice": 0.66, "hd95": 4.2, "cases": [{"case": "case-01", "dice": .., "hd95": ..}]}}

A demo site with noisy labels also reports ``val-dice-clean`` (its validation Dice against
the clean labels the demo generator knows), shown beside its ``val-dice`` in the report.
``holdout`` is null when the server has no held-out folder. Round 0 (the initial model) has
``status`` "initial" and only ``holdout``. :func:`write_report` redraws ``report.md``,
``holdout_dice.png`` and ``site_dice.png`` from the log; it draws with matplotlib's ``Figure``
and the Agg canvas directly, so it never touches pyplot's global state or a display.

Example:
    >>> import tempfile
    >>> log = MetricsLog(tempfile.mkdtemp())
    >>> log.append({"round": 1, "status": "ok", "sites": {}, "holdout": None})
    >>> [r["round"] for r in log.read()]
    [1]
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedmed.text import markdown_cell

__all__ = [
    "MetricsLog",
    "attempt_record",
    "completed_records",
    "json_safe",
    "privacy_report_lines",
    "write_report",
]


class MetricsLog:
    """Append-only JSON-lines log of round attempts in ``<out_dir>/metrics.jsonl``.

    Example:
        >>> import tempfile
        >>> MetricsLog(tempfile.mkdtemp()).read()
        []
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as a line, flushed to disk (NaN/inf written as null)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(json_safe(record), sort_keys=True, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        """All records; a torn last line (crash mid-write) is skipped."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def truncate_after(self, round_: int) -> None:
        """Keep only records of rounds <= ``round_`` (used when resuming from a checkpoint)."""
        kept = [r for r in self.read() if int(r["round"]) <= round_]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".metrics.")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        os.replace(tmp, self.path)


def json_safe(value: Any) -> Any:
    """NaN and infinity (e.g. HD95 of an empty prediction) become null: JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def completed_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The initial model's record and those of completed rounds (no failed attempts)."""
    return [r for r in records if r.get("status") in ("ok", "initial")]


def attempt_record(server_round: int, attempt: int) -> dict[str, Any]:
    """A round attempt's record before its replies are in: no sites, none rejected or missing
    (the round loop adds ``status``, ``duration-s`` and ``time``)."""
    return {"round": server_round, "attempt": attempt, "sites": {}, "rejected": {}, "missing": []}


def _plot(
    path: Path, title: str, ylabel: str, series: Mapping[str, list[tuple[int, float]]]
) -> None:
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, points in sorted(series.items()):
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    if any(series.values()):
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def cross_site_lines(out: Path, *, metric: str = "dice") -> list[str]:
    """The report's cross-site section from ``cross_site.json`` (empty when there is none)."""
    path = out / "cross_site.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = [e for e in data.get("entries", []) if e.get("metric", metric) == metric]
    models = sorted({e["model"] for e in entries})
    splits = sorted({e["data"] for e in entries}, key=lambda d: (d != "holdout", d))
    lines = [
        "",
        "## Cross-site evaluation",
        "",
        f"Mean {metric} [bootstrap 95% interval] (n cases) of every model on every site's "
        "validation split and the held-out set; a site discloses nothing below its disclosure "
        f"floor. Best round (by validation): {data.get('best-round')}. Missing sites: "
        f"{', '.join(markdown_cell(m) for m in data.get('missing', [])) or 'none'}.",
        "",
        "![cross-site](cross_site.png)",
        "",
        "| model | " + " | ".join(markdown_cell(s) for s in splits) + " |",
        "| --- |" + " --- |" * len(splits),
    ]
    cells = {(e["model"], e["data"]): e for e in entries}
    for model in models:
        row = []
        for split in splits:
            e = cells.get((model, split))
            if e is None:
                row.append("-")
            elif e.get("status") == "ok":
                row.append(f"{e['mean']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}] ({e['n']})")
            else:
                row.append(markdown_cell(e.get("status", "-")))
        lines.append(f"| {markdown_cell(model)} | " + " | ".join(row) + " |")
    return lines


def write_report(
    out_dir: str | os.PathLike[str],
    records: Sequence[Mapping[str, Any]],
    *,
    title: str = "fedmed federation report",
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Redraw ``report.md`` and its two PNG plots in ``out_dir``; return the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = completed_records(records)
    holdout = [
        (int(r["round"]), float(r["holdout"]["dice"]))
        for r in done
        if r.get("holdout") and r["holdout"].get("dice") is not None
    ]
    per_site: dict[str, list[tuple[int, float]]] = {}
    for r in done:
        for site, m in (r.get("sites") or {}).items():
            if m.get("val-dice") is not None:
                per_site.setdefault(site, []).append((int(r["round"]), float(m["val-dice"])))
    _plot(
        out / "holdout_dice.png", "held-out Dice of the global model", "Dice", {"held-out": holdout}
    )
    _plot(out / "site_dice.png", "validation Dice at each site", "Dice", per_site)

    lines = [f"# {title}", ""]
    rounds_ok = [r for r in records if r.get("status") == "ok"]
    records = [r for r in records if r.get("status") != "evaluation"] + [
        r for r in records if r.get("status") == "evaluation"
    ]
    failed = [r for r in records if r.get("status") == "failed"]
    lines.append(f"Completed rounds: {len(rounds_ok)}; failed attempts: {len(failed)}.")
    chosen = [r["selection"] for r in records if (r.get("selection") or {}).get("best")]
    if chosen:
        best_round = chosen[-1]["round"]
        test = dict(holdout).get(best_round)
        lines.append(
            f"Best model (by the sites' validation Dice {chosen[-1]['val-dice']:.4f}): round "
            f"{best_round}; its held-out Dice: {_fmt(test)}."
        )
    lines += ["", "![held-out Dice](holdout_dice.png)", "", "![site Dice](site_dice.png)", ""]
    lines += [
        "Model selection uses the sites' validation Dice of each round's global model (measured "
        "before they train on it); the held-out set is the test set: reported, never used to "
        "choose a model.",
        "",
        "## Rounds",
        "",
        "| round | attempt | status | held-out Dice | held-out HD95 | validation Dice of the "
        "round before | sites (val Dice after local training) |",
    ]
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        h = r.get("holdout") or {}
        sites = ", ".join(
            f"{markdown_cell(s)}: {_fmt((m or {}).get('val-dice'))}" + _clean_note(m)
            for s, m in sorted((r.get("sites") or {}).items())
        )
        notes = [
            f"{markdown_cell(s)} rejected ({markdown_cell(why)})"
            for s, why in sorted((r.get("rejected") or {}).items())
        ]
        notes += [f"{markdown_cell(s)} no reply" for s in r.get("missing") or []]
        notes += [
            f"{markdown_cell(s)} failed ({markdown_cell(why)})"
            for s, why in sorted((r.get("failed") or {}).items())
        ]
        cell = "; ".join([x for x in [sites, *notes] if x]) or "-"
        sel = r.get("selection") or {}
        best = ", best" if sel.get("best") else ""
        chosen = f"{_fmt(sel.get('val-dice'))} (round {sel['round']}{best})" if sel else "-"
        lines.append(
            f"| {r.get('round')} | {r.get('attempt', '-')} | {r.get('status')} | "
            f"{_fmt(h.get('dice'))} | {_fmt(h.get('hd95'))} | {chosen} | {cell} |"
        )
    last = next((r for r in reversed(done) if r.get("holdout")), None)
    if last and last["holdout"].get("cases"):
        lines += ["", f"## Held-out cases, round {last['round']}", "", "| case | Dice | HD95 |"]
        lines.append("| --- | --- | --- |")
        for case in last["holdout"]["cases"]:
            lines.append(
                f"| {markdown_cell(case['case'])} | {_fmt(case.get('dice'))} | "
                f"{_fmt(case.get('hd95'))} |"
            )
    lines += cross_site_lines(out)
    lines += privacy_report_lines(records)
    if settings:
        lines += ["", "## Settings", "", "| key | value |", "| --- | --- |"]
        lines += [f"| {k} | {markdown_cell(v)} |" for k, v in sorted(settings.items())]
    path = out / "report.md"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".report.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def _clean_note(metrics: Mapping[str, Any] | None) -> str:
    """`` (clean labels 0.71)`` for a demo site with noisy labels (``val-dice-clean``)."""
    clean = (metrics or {}).get("val-dice-clean")
    return "" if clean is None else f" (clean labels {_fmt(clean)})"


def privacy_report_lines(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown section (leading blank line) on the privacy spent, from the records' ``dp``
    (site mode: the server's accounting) and the sites' ``dp-epsilon`` metrics (record mode)."""
    spent = [
        (r.get("round"), r["dp"])
        for r in records
        if r.get("dp") and r["dp"].get("mode", "site") == "site"
    ]
    per_site = [
        (r.get("round"), site, m)
        for r in records
        for site, m in sorted((r.get("sites") or {}).items())
        if "dp-epsilon" in (m or {})
    ]
    if not spent and not per_site:
        return []
    lines = ["", "## Differential privacy"]
    if spent:
        lines += [
            "",
            "Site-level: each site's update clipped and noised; (epsilon, delta) from an RDP "
            "accountant under the adjacency shown. Every train attempt counts, failed ones too.",
            "",
            "| round | epsilon | delta | adjacency | releases | noise multiplier | clip norm |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for round_, dp in spent:
            eps = dp.get("epsilon")
            lines.append(
                f"| {round_} | {'inf (no noise)' if eps is None else f'{eps:.4f}'} | "
                f"{dp.get('delta')} | {dp.get('adjacency', 'add-remove')} | "
                f"{dp.get('releases')} | {dp.get('noise-multiplier')} | {dp.get('clip-norm')} |"
            )
    if per_site:
        lines += [
            "",
            "Record-level (DP-SGD, one patient added or removed), as each site accounts it "
            "over this run; `total` is the site's whole history.",
            "",
            "| round | site | epsilon | delta | steps | sample rate | noise multiplier | total |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for round_, site, m in per_site:
            lines.append(
                f"| {round_} | {site} | {m['dp-epsilon']:.4f} | {m.get('dp-delta')} | "
                f"{m.get('dp-steps')} | {m.get('dp-sample-rate')} | "
                f"{m.get('dp-noise-multiplier')} | {m.get('dp-epsilon-total', float('nan')):.4f} |"
            )
    return lines
