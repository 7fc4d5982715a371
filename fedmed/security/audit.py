"""Append-only audit log: JSON lines, each chained to the one before by its sha256.

Every line is one JSON object with ``seq`` (1, 2, ...), ``time`` (UTC), ``event`` and
``prev`` (sha256 hex of the previous line's bytes without its newline; 64 zeros for the first
line), plus the event's fields. Changing, removing, inserting or reordering a line breaks the
chain at that point; :func:`verify_audit_log` names the first broken line. Truncating the tail
cannot be seen from the chain alone: each signed server checkpoint signs the hash of the audit
line of its round (``audit_sha256``), so ``fedmed verify`` on an out-dir finds a log cut below
the last signed round; a site's log can be compared with the server's.

The server writes ``<out-dir>/audit.jsonl`` (run start with the config hash and, when it
signs, its signing certificate and CA; per round the sites that took part, sha256 of the global
model sent and of each reply received, the new checkpoint's hash, the DP budget spent); each
site writes ``<cache-dir>/audit.jsonl`` (per round: the hash of the global model received,
whether its signature verified, the hash of what it sent back, its DP settings).

Example:
    >>> log = AuditLog("run/audit.jsonl")
    >>> entry = log.append("round", round=1, sites=["A", "B"])
    >>> verify_audit_log("run/audit.jsonl")
    1
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from fedmed.errors import SecurityError

__all__ = [
    "AUDIT_FILE",
    "AuditError",
    "AuditLog",
    "checkpoint_claims",
    "file_claims",
    "line_hashes",
    "read_entries",
    "score_claims",
    "verify_audit_log",
]

AUDIT_FILE = "audit.jsonl"
_GENESIS = "0" * 64
_RESERVED = frozenset({"seq", "time", "event", "prev"})


class AuditError(SecurityError):
    """An audit log line was altered, removed, inserted or cannot be read."""

    exit_code = 7


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _last_line(path: Path) -> bytes | None:
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        size = min(end, 1 << 16)
        while True:
            fh.seek(end - size)
            tail = fh.read(size).rstrip(b"\n")
            cut = tail.rfind(b"\n")
            if cut >= 0 or size == end:
                return tail[cut + 1 :]
            size = min(end, size * 2)


class AuditLog:
    """Appends chained JSON lines to ``path`` (created with its folder on first append).

    One writer per file: the server process for ``<out-dir>``, a site for its ``cache-dir``.
    Values must be JSON (str, numbers, bools, lists, dicts, None).

    Example:
        >>> AuditLog("site-A/audit.jsonl").append("train", round=2, sent_sha256="ab12...")["seq"]
        1
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.head: str | None = None  # sha256 of the last line this object wrote

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one line for ``event`` chained to the last line; return the entry written."""
        clash = _RESERVED & set(fields)
        if clash:
            raise ValueError(f"audit fields {sorted(clash)} are reserved")
        with self._lock:
            last = _last_line(self.path)
            if last is None:
                prev, seq = _GENESIS, 1
            else:
                try:
                    seq = int(json.loads(last)["seq"]) + 1
                except (ValueError, KeyError, TypeError) as err:
                    raise AuditError(
                        f"audit log {self.path}: the last line cannot be read ({err}); keep the "
                        "file for the auditor and start a new one"
                    ) from err
                prev = _line_hash(last)
            entry = {
                "seq": seq,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "event": event,
                "prev": prev,
                **fields,
            }
            line = json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as fh:
                fh.write(line.encode() + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.head = _line_hash(line.encode())
        return entry


def verify_audit_log(path: str | os.PathLike[str]) -> int:
    """Check the chain of every line; return the number of lines.

    AuditError names the first line (1-based) that is malformed or whose ``prev`` does not
    match the line before (so an edited line N shows up as line N+1's broken link, or as line N
    itself when its own ``seq`` or ``prev`` were edited).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise AuditError(f"audit log {path} cannot be read ({err})") from err
    prev = _GENESIS
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        where = f"audit log {path} line {number}"
        try:
            entry = json.loads(line)
        except ValueError as err:
            raise AuditError(f"{where} is not JSON (altered or truncated): {err}") from err
        if not isinstance(entry, dict):
            raise AuditError(f"{where} is not a JSON object")
        if entry.get("seq") != number:
            raise AuditError(
                f"{where} has seq {entry.get('seq')!r}: a line was removed or inserted"
            )
        if entry.get("prev") != prev:
            raise AuditError(
                f"{where} does not chain to line {number - 1}: line {number - 1} was altered"
                if number > 1
                else f"{where} does not start the chain"
            )
        prev = _line_hash(line)
    return len(lines)


def line_hashes(path: str | os.PathLike[str]) -> set[str]:
    """sha256 of every line of an audit log (what checkpoint signatures refer to)."""
    return {_line_hash(line) for line in Path(path).read_bytes().split(b"\n") if line}


def read_entries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every line of an audit log as a dict (check it with :func:`verify_audit_log` first)."""
    entries = []
    for number, line in enumerate(Path(path).read_bytes().split(b"\n"), start=1):
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError as err:
            raise AuditError(f"audit log {path} line {number} is not JSON: {err}") from err
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def checkpoint_claims(entries: list[dict[str, Any]]) -> dict[int, str]:
    """Round -> checkpoint sha256 as the log last recorded it (``checkpoint_sha256`` fields).

    A ``start`` line with ``first_round`` k (a resumed run) withdraws what earlier lines said
    about rounds k and later: those rounds are written again after it.

    Example:
        >>> checkpoint_claims([{"event": "round", "round": 1, "checkpoint_sha256": "ab"}])
        {1: 'ab'}
    """
    claims: dict[int, str] = {}
    for entry in entries:
        first = entry.get("first_round")
        if entry.get("event") == "start" and isinstance(first, int):
            claims = {r: h for r, h in claims.items() if r < first}
        digest, round_ = entry.get("checkpoint_sha256"), entry.get("round")
        if isinstance(digest, str) and isinstance(round_, int) and not isinstance(round_, bool):
            claims[round_] = digest
    return claims


def score_claims(entries: list[dict[str, Any]]) -> dict[int, float] | None:
    """Round -> validation score as the log recorded them (``score`` lines, model selection);
    None when the log has no ``score`` line (a run from before scores were audited: then the
    checkpoints' own ``meta.json`` scores stand). A resumed run's ``start`` line withdraws the
    scores of the rounds it writes again, as :func:`checkpoint_claims` does."""
    scores: dict[int, float] = {}
    seen = False
    for entry in entries:
        first = entry.get("first_round")
        if entry.get("event") == "start" and isinstance(first, int):
            scores = {r: v for r, v in scores.items() if r < first}
        if entry.get("event") != "score":
            continue
        seen = True
        round_, score = entry.get("round"), entry.get("score")
        if isinstance(round_, int) and isinstance(score, (int, float)):
            scores[round_] = float(score)
    return scores if seen else None


def file_claims(entries: list[dict[str, Any]]) -> dict[str, str]:
    """File name -> sha256 of the run's result files as the log last recorded them (lines with
    ``file`` and ``sha256``, e.g. ``cross-site``)."""
    claims: dict[str, str] = {}
    for entry in entries:
        name, digest = entry.get("file"), entry.get("sha256")
        if isinstance(name, str) and isinstance(digest, str):
            claims[name] = digest
    return claims
