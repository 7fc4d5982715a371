"""``fedmed verify PATH [--ca ca.pem] [--require-signatures]``: check a run's integrity.

PATH is a run's ``out-dir`` (with ``checkpoints/`` and ``audit.jsonl``), its ``checkpoints``
folder, or an ``audit.jsonl`` file (a site's, say). Checked: every checkpoint round's files
against its ``meta.json``, the parent-hash chain from round 0, each ``signature.json`` (with
``--ca``: also that the federation's CA issued the signing certificate) and the audit log's
line chain. The first broken link is named and the exit code is SecurityError's (7).

Example::

    fedmed verify runs/server --ca certs/ca.pem --require-signatures
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedmed.errors import SecurityError
from fedmed.security.audit import AUDIT_FILE, line_hashes, verify_audit_log
from fedmed.security.signing import Verifier, verify_checkpoints

__all__ = ["register", "verify_path"]


def register(subparsers: Any) -> None:
    """Add the ``verify`` subcommand."""
    parser = subparsers.add_parser(
        "verify",
        help="check checkpoint hash chain, signatures and audit log of a run",
        description=(
            "Check a run folder (checkpoints/ and audit.jsonl), a checkpoints folder or an "
            "audit.jsonl file; name the first broken link. Exit code 7 when anything fails."
        ),
    )
    parser.add_argument("path", type=Path, help="out-dir, checkpoints folder or audit.jsonl")
    parser.add_argument(
        "--ca", type=Path, default=None, help="federation CA (ca.pem): check who signed"
    )
    parser.add_argument(
        "--require-signatures",
        action="store_true",
        help="fail on an unsigned checkpoint (default: report it)",
    )
    parser.set_defaults(func=_run)


def verify_path(
    path: Path, *, ca: Path | None = None, require_signatures: bool = False
) -> list[str]:
    """Verify what ``path`` holds; return one summary line per part checked.

    Raises SecurityError at the first broken link, or when ``path`` holds nothing to check.
    """
    verifier = Verifier.from_ca_file(ca) if ca is not None else Verifier()
    lines: list[str] = []
    if path.is_file():
        count = verify_audit_log(path)
        return [f"audit log {path}: {count} lines, chain intact"]
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else None
    if ckpt_dir is None and any(p.name.startswith("round-") for p in _children(path)):
        ckpt_dir = path
    audit = path / AUDIT_FILE
    if ckpt_dir is None and not audit.is_file():
        raise SecurityError(
            f"{path} holds no checkpoints/ folder, round-NNNN folders or {AUDIT_FILE}: give a "
            "run's out-dir, its checkpoints folder or an audit log"
        )
    if audit.is_file():  # first: an edited line is named by its number
        lines.append(f"audit log {audit}: {verify_audit_log(audit)} lines, chain intact")
    if ckpt_dir is not None:
        rounds, signed = verify_checkpoints(
            ckpt_dir,
            verifier=verifier,
            require_signatures=require_signatures,
            audit_lines=line_hashes(audit) if audit.is_file() else None,
        )
        unsigned = len(rounds) - len(signed)
        who = "signer checked against the CA" if ca is not None else "signer not checked (no --ca)"
        lines.append(
            f"checkpoints {ckpt_dir}: rounds 0..{rounds[-1] if rounds else -1} chained, "
            f"{len(signed)} signed ({who}), {unsigned} unsigned"
        )
    return lines


def _children(path: Path) -> list[Path]:
    return list(path.iterdir()) if path.is_dir() else []


def _run(args: argparse.Namespace) -> int:
    for line in verify_path(args.path, ca=args.ca, require_signatures=args.require_signatures):
        print(line)
    print("OK")
    return 0
