"""Audit log: chained JSON lines; any edited, removed or inserted line is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmed.security.audit import (
    AuditError,
    AuditLog,
    checkpoint_claims,
    read_entries,
    verify_audit_log,
)


@pytest.fixture()
def log_path(tmp_path: Path) -> Path:
    log = AuditLog(tmp_path / "sub" / "audit.jsonl")
    log.append("start", config_sha256="c" * 64)
    for r in (1, 2, 3):
        log.append("round", round=r, sites=["A", "B"], received={"A": f"{r}a", "B": f"{r}b"})
    return log.path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_lines_are_numbered_and_chained(log_path) -> None:
    entries = [json.loads(line) for line in _lines(log_path)]

    assert [e["seq"] for e in entries] == [1, 2, 3, 4]
    assert entries[0]["prev"] == "0" * 64
    assert entries[2]["round"] == 2 and entries[2]["sites"] == ["A", "B"]
    assert verify_audit_log(log_path) == 4


def test_a_new_writer_continues_the_chain(log_path) -> None:
    AuditLog(log_path).append("stop", rounds=3)

    assert verify_audit_log(log_path) == 5
    assert json.loads(_lines(log_path)[-1])["seq"] == 5


def test_edited_line_is_named(log_path) -> None:
    lines = _lines(log_path)
    lines[1] = lines[1].replace('"1a"', '"ff"')
    log_path.write_text("\n".join(lines) + "\n")

    with pytest.raises(AuditError, match="line 3 does not chain to line 2: line 2 was altered"):
        verify_audit_log(log_path)


def test_removed_and_inserted_lines_are_named(log_path) -> None:
    lines = _lines(log_path)
    log_path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with pytest.raises(AuditError, match="line 2 has seq 3"):
        verify_audit_log(log_path)

    log_path.write_text("\n".join([*lines[:2], "{not json", *lines[2:]]) + "\n")
    with pytest.raises(AuditError, match="line 3 is not JSON"):
        verify_audit_log(log_path)


def test_reserved_fields_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        AuditLog(tmp_path / "a.jsonl").append("x", seq=3)


def test_checkpoint_claims_follow_the_last_record_and_resumes(tmp_path) -> None:
    # Prepare: round 2 recorded, its folder deleted, the run resumed at round 2 and redone
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("initial", round=0, checkpoint_sha256="a" * 64)
    log.append("round", round=1, checkpoint_sha256="b" * 64)
    log.append("round", round=2, checkpoint_sha256="c" * 64)
    log.append("round", round=3, checkpoint_sha256=None, status="failed")
    log.append("start", first_round=2)

    # Execute + Assert: the resumed start withdraws round 2 until it is recorded again
    assert checkpoint_claims(read_entries(log.path)) == {0: "a" * 64, 1: "b" * 64}
    log.append("round", round=2, checkpoint_sha256="d" * 64)
    assert checkpoint_claims(read_entries(log.path))[2] == "d" * 64
