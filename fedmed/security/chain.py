"""A run's checkpoint chain: signing each round, and checking it before anyone relies on it.

Each ``checkpoints/round-NNNN`` folder (:mod:`fedmed.server.checkpoint`) holds ``meta.json``
(the round, its weights and server-state sha256, its parent's weights sha256) and, when the run
signs, ``signature.json``: the server's signature over ``{"kind": "checkpoint", "round",
"weights_sha256", "parent_hash", "meta_sha256"}`` plus the hash of the round's audit line.

Checks, from cheap to thorough:

- :func:`verify_links`: the signed ``meta.json`` chain from round 0, every round signed by a
  certificate the :class:`~fedmed.security.signing.Verifier` trusts, no weights read; resume
  and ``fedmed infer --ca`` run it, then :func:`check_round_files` on the one round they load;
- :func:`verify_checkpoints`: every file of every round (``fedmed verify``);
- :mod:`.pointers`: ``latest.json``, ``best.json`` and the audit log name exactly the
  checkpoints that exist (a deleted last round fails), and the one round ``fedmed infer`` is
  about to load.

Not detectable from the folder alone: deleting the last rounds together with the pointers and
the matching audit lines (a rollback); compare with a site's audit log or a backup.

Example:
    >>> verifier = Verifier.from_ca_file("certs/ca.pem")
    >>> links = verify_links("runs/server/checkpoints", verifier=verifier)
    >>> check_round_files(links[-1])
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmed.errors import SecurityError

from .signing import SignatureError, Signer, Verifier

__all__ = [
    "META_FILE",
    "SIGNATURE_FILE",
    "Link",
    "check_round_files",
    "checkpoint_payload",
    "checkpoint_signature",
    "file_sha256",
    "read_links",
    "read_meta",
    "round_folder_name",
    "round_folders",
    "sign_checkpoint",
    "verify_checkpoints",
    "verify_links",
]

SIGNATURE_FILE = "signature.json"
META_FILE = "meta.json"
_FILES = {
    "weights.safetensors": "weights_sha256",
    "server_state.safetensors": "server_state_sha256",
}


@dataclass(frozen=True)
class Link:
    """One round of a checked chain: its folder and its (signed, when checked so) metadata."""

    round: int
    folder: Path
    meta: dict[str, Any]

    @property
    def weights_sha256(self) -> str:
        """The round's checkpoint hash (sha256 of ``weights.safetensors``)."""
        return str(self.meta["weights_sha256"])


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def round_folder_name(round_: int) -> str:
    """``round-NNNN``: the folder name of a round's checkpoint."""
    return f"round-{round_:04d}"


def round_folders(root: Path) -> list[tuple[int, Path]]:
    """``(round, folder)`` of every ``round-NNNN`` folder under ``root``, ascending."""
    found = []
    for entry in root.iterdir():
        name = entry.name
        if entry.is_dir() and name.startswith("round-") and name[6:].isdigit():
            found.append((int(name[6:]), entry))
    return sorted(found)


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64


def read_meta(folder: Path, *, what: str) -> dict[str, Any]:
    """A round's ``meta.json`` with its chain fields checked; SignatureError names ``what``."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as err:
        raise SignatureError(f"{what}: {META_FILE} cannot be read ({err})") from err
    if not isinstance(meta, dict):
        raise SignatureError(f"{what}: {META_FILE} is not a JSON object")
    round_ = meta.get("round")
    if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
        raise SignatureError(f"{what}: {META_FILE} has round {round_!r}")
    if not all(_is_hash(meta.get(key)) for key in _FILES.values()):
        raise SignatureError(f"{what}: {META_FILE} lacks the sha256 of its files")
    if meta.get("parent_hash") is not None and not _is_hash(meta["parent_hash"]):
        raise SignatureError(f"{what}: {META_FILE} has parent_hash {meta['parent_hash']!r}")
    return meta


def checkpoint_payload(folder: Path) -> dict[str, Any]:
    """What a checkpoint's signature covers, read from its ``meta.json``."""
    meta_bytes = (folder / META_FILE).read_bytes()
    meta = json.loads(meta_bytes)
    return {
        "kind": "checkpoint",
        "round": int(meta["round"]),
        "weights_sha256": meta["weights_sha256"],
        "parent_hash": meta["parent_hash"],
        "meta_sha256": hashlib.sha256(meta_bytes).hexdigest(),
    }


def sign_checkpoint(
    folder: str | os.PathLike[str], signer: Signer, *, audit_sha256: str | None = None
) -> Path:
    """Write ``signature.json`` into a checkpoint folder (atomically); return its path.

    ``audit_sha256`` (the hash of the audit line of this round) is signed along, so a
    truncated audit log shows up in :func:`verify_checkpoints`.
    """
    folder = Path(folder)
    payload = checkpoint_payload(folder)
    if audit_sha256 is not None:
        payload["audit_sha256"] = audit_sha256
    signed = signer.sign(payload)
    path = folder / SIGNATURE_FILE
    tmp = folder / f".{SIGNATURE_FILE}.tmp"
    tmp.write_text(json.dumps(signed, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def checkpoint_signature(folder: Path, verifier: Verifier, *, what: str) -> str | None:
    """Check ``folder``'s ``signature.json`` against its ``meta.json``; return the audit line
    hash it signs (None when it signs none). SignatureError when it is missing or fails."""
    sig_file = folder / SIGNATURE_FILE
    if not sig_file.is_file():
        raise SignatureError(f"{what}: {SIGNATURE_FILE} is missing (unsigned checkpoint)")
    try:
        record = json.loads(sig_file.read_text())
        expected = checkpoint_payload(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SignatureError(
            f"{what}: {SIGNATURE_FILE} or {META_FILE} cannot be read ({err})"
        ) from err
    if not isinstance(record, dict):
        raise SignatureError(f"{what}: {SIGNATURE_FILE} is not a JSON object")
    payload = verifier.verify(record, what=what)
    audit_hash = payload.pop("audit_sha256", None)
    if payload != expected:
        raise SignatureError(f"{what}: the signature does not cover this {META_FILE}")
    return audit_hash if isinstance(audit_hash, str) else None


def check_round_files(link: Link) -> None:
    """SignatureError unless the round's files hash to what its ``meta.json`` says."""
    for name, key in _FILES.items():
        try:
            digest = file_sha256(link.folder / name)
        except OSError as err:
            raise SignatureError(
                f"round {link.round} ({link.folder}): {name} cannot be read ({err})"
            ) from err
        if digest != link.meta[key]:
            raise SignatureError(
                f"round {link.round} ({link.folder}): {name} does not match {META_FILE} (sha256 "
                f"{digest[:12]}, meta.json says {str(link.meta[key])[:12]})"
            )


def verify_links(
    root: str | os.PathLike[str], *, verifier: Verifier, upto: int | None = None
) -> list[Link]:
    """The signed chain of ``meta.json`` from round 0 to ``upto`` (default: the last round).

    Every round must be there, signed (``verifier`` decides by whom) over exactly its
    ``meta.json``, and name the round before's weights hash as its parent. Weights are not
    read: call :func:`check_round_files` on a round before loading it. SignatureError names
    the first broken link.
    """
    root = Path(root)
    if not root.is_dir():
        raise SignatureError(f"checkpoint folder {root} does not exist")
    links: list[Link] = []
    parent: str | None = None
    for expected, (round_, folder) in enumerate(round_folders(root)):
        if upto is not None and round_ > upto:
            break
        if round_ != expected:
            raise SignatureError(f"first broken link: round {expected} is missing in {root}")
        where = f"first broken link: round {round_} ({folder})"
        meta = read_meta(folder, what=where)
        if meta["round"] != round_:
            raise SignatureError(f"{where}: {META_FILE} says round {meta['round']}")
        if meta.get("parent_hash") != parent:
            raise SignatureError(
                f"{where}: parent_hash {str(meta.get('parent_hash'))[:12]} is not the hash "
                f"{str(parent)[:12]} of the round before"
            )
        checkpoint_signature(folder, verifier, what=where)
        links.append(Link(round_, folder, meta))
        parent = meta["weights_sha256"]
    last = upto if upto is not None else (links[-1].round if links else 0)
    if not links or links[-1].round != last:
        raise SignatureError(f"first broken link: round {len(links)} is missing in {root}")
    return links


def verify_checkpoints(
    root: str | os.PathLike[str],
    *,
    verifier: Verifier | None = None,
    require_signatures: bool = False,
    audit_lines: set[str] | None = None,
) -> tuple[list[int], list[int]]:
    """Check every file of every round; return (the rounds checked, the rounds signed).

    Each round must exist from 0 on, its files must match ``meta.json``, its ``parent_hash``
    must be the round before's weights hash and, where ``signature.json`` is present (required
    with ``require_signatures``), the signature must cover exactly that ``meta.json`` and, with
    ``audit_lines`` (:func:`fedmed.security.audit.line_hashes`), the audit line it names must
    be in the log. SignatureError names the first broken link.
    """
    root = Path(root)
    if not root.is_dir():
        raise SecurityError(f"checkpoint folder {root} does not exist")
    verifier = verifier or Verifier()
    rounds: list[int] = []
    signed: list[int] = []
    parent: str | None = None
    for expected, (round_, folder) in enumerate(round_folders(root)):
        if round_ != expected:
            raise SignatureError(f"first broken link: round {expected} is missing in {root}")
        where = f"first broken link: round {round_} ({folder})"
        meta = read_meta(folder, what=where)
        if meta["round"] != round_:
            raise SignatureError(f"{where}: {META_FILE} says round {meta['round']}")
        link = Link(round_, folder, meta)
        try:
            check_round_files(link)
        except SignatureError as err:
            raise SignatureError(f"first broken link: {err}") from err
        if meta.get("parent_hash") != parent:
            raise SignatureError(
                f"{where}: parent_hash {str(meta.get('parent_hash'))[:12]} is not the hash "
                f"{str(parent)[:12]} of the round before"
            )
        if (folder / SIGNATURE_FILE).is_file() or require_signatures:
            audit_hash = checkpoint_signature(folder, verifier, what=where)
            if audit_lines is not None and audit_hash is not None and audit_hash not in audit_lines:
                raise SignatureError(
                    f"{where}: the audit line signed with this round ({audit_hash[:12]}) is not in "
                    "the audit log: the log was truncated or altered"
                )
            signed.append(round_)
        rounds.append(round_)
        parent = link.weights_sha256
    return rounds, signed


def read_links(root: str | os.PathLike[str]) -> list[Link]:
    """The rounds of a checkpoint folder with their metadata, unchecked (after
    :func:`verify_checkpoints`, for :func:`check_pointers` and :func:`check_audit_claims`)."""
    root = Path(root)
    return [
        Link(round_, folder, read_meta(folder, what=f"round {round_} ({folder})"))
        for round_, folder in round_folders(root)
    ]
