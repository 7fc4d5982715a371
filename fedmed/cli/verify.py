"""``fedmed verify PATH [--ca ca.pem] [--allow-unsigned]``: check a run's integrity.

PATH is a run's ``out-dir`` (with ``checkpoints/`` and ``audit.jsonl``), its ``checkpoints``
folder, or an ``audit.jsonl`` file (a site's, say). Checked:

- the audit log's line chain;
- every checkpoint round's files against its ``meta.json``, the parent-hash chain from round 0
  and each ``signature.json`` (:mod:`fedmed.security.chain`);
- that ``latest.json``, ``best.json`` and the checkpoint hashes the audit log records agree
  with the checkpoints (a deleted last round fails).

Who signed is checked against ``--ca``; without it, against the CA the run recorded in its
audit log's ``start`` lines, and the output says so: whoever can rewrite the run folder can
rewrite that record too. Signatures are required whenever a CA is known (given or recorded) or
the run recorded that it signs; ``--allow-unsigned`` accepts unsigned rounds (and reports them),
``--require-signatures`` requires them even when nothing is known. The first broken link is
named and the exit code is SecurityError's (7).

Example::

    fedmed verify runs/server --ca certs/ca.pem
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmed.errors import ConfigError, SecurityError
from fedmed.security.audit import (
    AUDIT_FILE,
    checkpoint_claims,
    file_claims,
    line_hashes,
    read_entries,
    score_claims,
    verify_audit_log,
)
from fedmed.security.chain import read_links, verify_checkpoints
from fedmed.security.pointers import check_audit_claims, check_pointers
from fedmed.security.signing import Verifier, certificate_fingerprint

__all__ = ["register", "verify_path"]


def register(subparsers: Any) -> None:
    """Add the ``verify`` subcommand."""
    parser = subparsers.add_parser(
        "verify",
        help="check checkpoint hash chain, signatures, pointers and audit log of a run",
        description=(
            "Check a run folder (checkpoints/ and audit.jsonl), a checkpoints folder or an "
            "audit.jsonl file; name the first broken link. Signatures are required whenever a "
            "CA is known (--ca, or recorded in the run's audit log). Exit code 7 when anything "
            "fails."
        ),
    )
    parser.add_argument("path", type=Path, help="out-dir, checkpoints folder or audit.jsonl")
    parser.add_argument(
        "--ca",
        type=Path,
        default=None,
        help="your copy of the federation CA (ca.pem): check who signed (default: the CA the "
        "run recorded, which whoever rewrites the folder can rewrite too)",
    )
    parser.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="accept unsigned checkpoints even when a CA is known (they are reported)",
    )
    parser.add_argument(
        "--require-signatures",
        action="store_true",
        help="fail on an unsigned checkpoint even when no CA is known",
    )
    parser.set_defaults(func=_run)


@dataclass(frozen=True)
class _Trust:
    verifier: Verifier
    short: str  # for the checkpoints line
    anchor: str  # the whole story, one line
    signs: bool  # a CA is known or the run recorded that it signs


def _trust(ca: Path | None, entries: list[dict[str, Any]], audit: Path) -> _Trust:
    if ca is not None:
        verifier = Verifier.from_ca_file(ca)
        assert verifier.ca_pem is not None
        fingerprint = certificate_fingerprint(verifier.ca_pem)
        return _Trust(
            verifier,
            "signer checked against the CA",
            f"trust anchor: the CA given with --ca ({ca}, sha256 {fingerprint[:16]})",
            True,
        )
    starts = [e for e in entries if e.get("event") == "start"]
    cas = {e["ca_cert"] for e in starts if isinstance(e.get("ca_cert"), str)}
    certs = {e["signing_cert"] for e in starts if isinstance(e.get("signing_cert"), str)}
    signs = any(e.get("signing_cert_sha256") for e in starts)
    caveat = (
        "whoever can rewrite this folder can rewrite that record too: pass --ca with your own "
        "copy of ca.pem to check who signed"
    )
    if len(cas) > 1:
        raise SecurityError(
            f"audit log {audit} records {len(cas)} different CAs in its start lines: pass --ca "
            "with the federation's ca.pem"
        )
    if cas:
        pem = next(iter(cas))
        fingerprint = certificate_fingerprint(pem)
        return _Trust(
            Verifier.from_ca_pem(pem, what=f"audit log {audit}"),
            "signer checked against the CA recorded in the run folder",
            f"trust anchor: the CA recorded in the run's own audit log {audit} (sha256 "
            f"{fingerprint[:16]}), not a copy of your own; {caveat}",
            True,
        )
    if certs:
        return _Trust(
            Verifier(pinned=frozenset(certificate_fingerprint(c) for c in certs)),
            "signer checked against the certificate recorded in the run folder",
            f"trust anchor: the signing certificate recorded in the run's own audit log "
            f"{audit}; {caveat}",
            True,
        )
    known = "the run recorded that it signs, but no CA" if signs else "no CA recorded in the run"
    return _Trust(
        Verifier(),
        "signer not checked (no --ca)",
        f"trust anchor: none (no --ca, {known}): signatures show integrity, not who signed",
        signs,
    )


def verify_path(
    path: Path,
    *,
    ca: Path | None = None,
    allow_unsigned: bool = False,
    require_signatures: bool = False,
) -> list[str]:
    """Verify what ``path`` holds; return one summary line per part checked.

    Raises SecurityError at the first broken link, or when ``path`` holds nothing to check;
    ConfigError when both ``allow_unsigned`` and ``require_signatures`` are set.
    """
    if allow_unsigned and require_signatures:
        raise ConfigError("--allow-unsigned and --require-signatures contradict: give one")
    if path.is_file():
        count = verify_audit_log(path)
        return [f"audit log {path}: {count} lines, chain intact"]
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else None
    if ckpt_dir is None and any(p.name.startswith("round-") for p in _children(path)):
        ckpt_dir = path
    audit = path / AUDIT_FILE
    if not audit.is_file() and ckpt_dir == path and (path.parent / AUDIT_FILE).is_file():
        audit = path.parent / AUDIT_FILE  # the checkpoints folder of a run
    if ckpt_dir is None and not audit.is_file():
        raise SecurityError(
            f"{path} holds no checkpoints/ folder, round-NNNN folders or {AUDIT_FILE}: give a "
            "run's out-dir, its checkpoints folder or an audit log"
        )
    lines: list[str] = []
    entries: list[dict[str, Any]] = []
    if audit.is_file():  # first: an edited line is named by its number
        lines.append(f"audit log {audit}: {verify_audit_log(audit)} lines, chain intact")
        entries = read_entries(audit)
    if ckpt_dir is None:
        return lines
    trust = _trust(ca, entries, audit)
    required = require_signatures or (trust.signs and not allow_unsigned)
    rounds, signed = verify_checkpoints(
        ckpt_dir,
        verifier=trust.verifier,
        require_signatures=required,
        audit_lines=line_hashes(audit) if audit.is_file() else None,
    )
    unsigned = len(rounds) - len(signed)
    lines.append(
        f"checkpoints {ckpt_dir}: rounds 0..{rounds[-1] if rounds else -1} chained, "
        f"{len(signed)} signed ({trust.short}), {unsigned} unsigned"
    )
    lines.append(trust.anchor)
    links = read_links(ckpt_dir)
    scores = score_claims(entries) if entries else None
    lines.append(f"pointers: {check_pointers(ckpt_dir, links, scores=scores)}")
    if entries:
        lines.append(check_audit_claims(checkpoint_claims(entries), links, audit=audit))
        lines += _check_files(path, file_claims(entries), audit=audit)
    if unsigned:
        why = "--allow-unsigned" if allow_unsigned else "no CA known"
        lines.append(
            f"WARNING: {unsigned} unsigned round(s) accepted ({why}): nothing shows who wrote them"
        )
    return lines


def _check_files(run: Path, claims: dict[str, str], *, audit: Path) -> list[str]:
    """The run's result files (``cross_site.json``) must hash as the audit log recorded them."""
    lines = []
    for name, digest in sorted(claims.items()):
        target = run / name
        if not target.is_file():
            raise SecurityError(
                f"audit log {audit} records {name} (sha256 {digest[:12]}) but {target} is "
                "missing: it was deleted"
            )
        actual = hashlib.sha256(target.read_bytes()).hexdigest()
        if actual != digest:
            raise SecurityError(
                f"{target} has sha256 {actual[:12]} but the audit log {audit} recorded "
                f"{digest[:12]}: it was changed after the run wrote it"
            )
        lines.append(f"{name}: sha256 {digest[:12]} as the audit log recorded")
    return lines


def _children(path: Path) -> list[Path]:
    return list(path.iterdir()) if path.is_dir() else []


def _run(args: argparse.Namespace) -> int:
    lines = verify_path(
        args.path,
        ca=args.ca,
        allow_unsigned=args.allow_unsigned,
        require_signatures=args.require_signatures,
    )
    for line in lines:
        print(line)
    print("OK")
    return 0
