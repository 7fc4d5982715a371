"""metrics.jsonl and the Markdown report with its PNG plots."""

from __future__ import annotations

import math

from fedmed.server.report import MetricsLog, privacy_report_lines, write_report


def _record(r, status="ok", dice=0.5):
    return {
        "round": r,
        "attempt": 1,
        "status": status,
        "sites": {"A": {"val-dice": dice, "num-examples": 10}, "B": {"val-dice": dice / 2}},
        "rejected": {"C": "update norm 9 exceeds max-update-norm 1"} if r == 2 else {},
        "missing": [],
        "holdout": {
            "dice": dice,
            "hd95": math.inf,
            "cases": [{"case": "case-01", "dice": dice, "hd95": 3.0}],
        },
    }


def test_log_appends_reads_and_writes_inf_as_null(tmp_path):
    log = MetricsLog(tmp_path)
    log.append(_record(1))
    log.append(_record(2, dice=0.7))
    records = log.read()
    assert [r["round"] for r in records] == [1, 2]
    assert records[0]["holdout"]["hd95"] is None


def test_truncate_after_drops_later_rounds(tmp_path):
    log = MetricsLog(tmp_path)
    for r in (1, 2, 3):
        log.append(_record(r))
    log.truncate_after(2)
    assert [r["round"] for r in log.read()] == [1, 2]


def test_torn_last_line_is_skipped(tmp_path):
    log = MetricsLog(tmp_path)
    log.append(_record(1))
    with log.path.open("a") as fh:
        fh.write('{"round": 2, "sta')
    assert [r["round"] for r in log.read()] == [1]


def test_report_has_plots_table_and_best_round(tmp_path):
    # Prepare: round 2 has the better held-out (test) Dice, round 1 the better validation Dice
    records = [_record(1, dice=0.4), _record(2, status="failed"), _record(2, dice=0.8)]
    records[2]["selection"] = {"round": 1, "val-dice": 0.6, "val-cases": 3, "best": True}
    # Execute
    path = write_report(tmp_path, records, settings={"strategy": "fedavg"})
    # Assert
    text = path.read_text()
    assert "Completed rounds: 2; failed attempts: 1." in text
    # the best model is the one chosen on validation data, shown with its test result
    assert (
        "Best model (by the sites' validation Dice 0.6000): round 1; its held-out Dice: 0.4000"
        in text
    )
    assert "C rejected (update norm 9 exceeds max-update-norm 1)" in text
    assert "| strategy | fedavg |" in text
    for png in ("holdout_dice.png", "site_dice.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_holdout_still_draws(tmp_path):
    records = [{"round": 1, "status": "ok", "sites": {"A": {"val-dice": 0.3}}, "holdout": None}]
    text = write_report(tmp_path, records).read_text()
    assert "Completed rounds: 1" in text and "Best model" not in text
    assert (tmp_path / "site_dice.png").is_file()


def test_names_and_reasons_from_sites_cannot_break_the_report(tmp_path):
    record = _record(1)
    record["sites"] = {"A|x\n## forged": {"val-dice": 0.5}}
    record["rejected"] = {"B": "evil\n| 1 | ok |\x1b[2J"}
    text = write_report(tmp_path, [record]).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1  # the round's row stays one row
    assert "\x1b" not in text and "A\\|x\\n## forged" in rows[0]


def test_report_lines_show_site_and_record_level_privacy() -> None:
    records = [
        {
            "round": 1,
            "dp": {"mode": "site", "epsilon": 9.5527, "delta": 1e-5, "adjacency": "replace-one"},
        },
        {"round": 2, "sites": {"A": {"dp-epsilon": 1.25, "dp-steps": 50, "dp-epsilon-total": 2}}},
    ]

    text = "\n".join(privacy_report_lines(records))

    assert "| 1 | 9.5527 | 1e-05 | replace-one |" in text
    assert "| 2 | A | 1.2500 |" in text
    assert privacy_report_lines([{"round": 1, "sites": {"A": {"val-dice": 0.5}}}]) == []
