"""What names a checkpoint, checked against the chain (:mod:`.chain`): ``latest.json``,
``best.json``, the audit log's checkpoint lines, and the one round ``fedmed infer`` loads.

- :func:`check_pointers`: ``latest.json`` names the last round and ``best.json`` the best scored
  one, both with their hashes (a deleted last round fails);
- :func:`check_audit_claims`: every checkpoint the audit log records exists with that hash;
- :func:`check_loadable`: the round ``fedmed infer`` is about to load, with the pointer that
  named it.

Example:
    >>> from fedmed.security.chain import read_links
    >>> links = read_links("runs/server/checkpoints")
    >>> check_pointers(Path("runs/server/checkpoints"), links)
    'latest.json -> round 12, best.json -> round 9'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from fedmed.errors import FedmedError

from .audit import AUDIT_FILE, read_entries, score_claims
from .chain import (
    META_FILE,
    Link,
    check_round_files,
    checkpoint_signature,
    read_meta,
    round_folder_name,
    verify_links,
)
from .signing import SignatureError, Verifier

__all__ = [
    "check_audit_claims",
    "check_loadable",
    "check_pointers",
    "expected_best",
    "read_pointer",
]


def read_pointer(
    path: Path, *, error: type[FedmedError] = SignatureError
) -> tuple[int, str] | None:
    """``(round, hash)`` of ``latest.json`` / ``best.json``; None when the file is absent."""
    if not path.is_file():
        return None
    try:
        pointer = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise error(f"{path} cannot be read ({err}): restore it or delete it") from err
    round_ = pointer.get("round") if isinstance(pointer, dict) else None
    digest = pointer.get("hash") if isinstance(pointer, dict) else None
    if (
        not isinstance(round_, int)
        or isinstance(round_, bool)
        or round_ < 0
        or not isinstance(digest, str)
    ):
        raise error(f"{path} is not a checkpoint pointer ({{'round': N, 'hash': sha256}})")
    return round_, digest


def expected_best(links: list[Link], scores: Mapping[int, float] | None = None) -> Link | None:
    """The round ``best.json`` must name: the first with the highest finite score, from
    ``scores`` (the audit log's ``score`` lines) or else the checkpoints' ``meta.json``."""
    best: Link | None = None
    chosen: dict[int, float] = {}
    for link in links:
        score = scores.get(link.round) if scores is not None else link.meta.get("score")
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            continue
        if not math.isfinite(score):
            continue
        if best is None or score > chosen[best.round]:
            best = link
        chosen[link.round] = float(score)
    return best


def check_pointers(
    root: Path, links: list[Link], *, scores: Mapping[int, float] | None = None
) -> str:
    """SignatureError unless ``latest.json`` names the last round and ``best.json`` the best
    one (both with their hashes; scores as :func:`expected_best`); return a summary line."""
    if not links:
        return "no rounds, no pointers"
    last = links[-1]
    latest = read_pointer(root / "latest.json")
    if latest is None:
        raise SignatureError(
            f"{root / 'latest.json'} is missing although rounds 0..{last.round} exist: it was "
            "deleted (or the run stopped right after writing round 0)"
        )
    if latest != (last.round, last.weights_sha256):
        if latest[0] > last.round:
            why = f"round {latest[0]} does not exist: the last checkpoint was deleted"
        elif latest[0] < last.round:
            why = f"the last checkpoint is round {last.round}"
        else:
            why = f"round {last.round} has sha256 {last.weights_sha256[:12]}: it was replaced"
        raise SignatureError(
            f"{root / 'latest.json'} names round {latest[0]} (sha256 {latest[1][:12]}) but {why}"
        )
    best = read_pointer(root / "best.json")
    want = expected_best(links, scores)
    if want is None:
        if best is not None:
            raise SignatureError(
                f"{root / 'best.json'} names round {best[0]} but no checkpoint has a score"
            )
        return f"latest.json -> round {last.round}; no best.json (no scored round)"
    if best != (want.round, want.weights_sha256):
        named = "missing" if best is None else f"round {best[0]} (sha256 {best[1][:12]})"
        raise SignatureError(
            f"{root / 'best.json'} is {named} but the best scored checkpoint is round {want.round} "
            f"(sha256 {want.weights_sha256[:12]}): it was altered, or names a deleted round"
        )
    return f"latest.json -> round {last.round}, best.json -> round {want.round}"


def check_audit_claims(claims: dict[int, str], links: list[Link], *, audit: Path) -> str:
    """SignatureError unless every checkpoint the audit log records exists with that hash."""
    by_round = {link.round: link for link in links}
    for round_, digest in sorted(claims.items()):
        link = by_round.get(round_)
        if link is None:
            raise SignatureError(
                f"audit log {audit} records checkpoint round {round_} (sha256 {digest[:12]}) but "
                f"the checkpoints end at round {links[-1].round if links else -1}: that round "
                "was deleted"
            )
        if link.weights_sha256 != digest:
            raise SignatureError(
                f"audit log {audit} records checkpoint round {round_} with sha256 {digest[:12]} "
                f"but {link.folder} has {link.weights_sha256[:12]}: the checkpoint was replaced"
            )
    return f"audit log records {len(claims)} checkpoint(s), all present with their hashes"


def check_loadable(
    folder: Path,
    *,
    verifier: Verifier | None,
    pointer: tuple[Path, int, str] | None = None,
) -> Link | None:
    """Check the round in ``folder`` before its weights are loaded; return its link.

    With ``verifier``: the signed chain from round 0 when the folder sits in its run's
    checkpoints folder (a lone round folder: its own signature), the round's files against its
    ``meta.json``, and ``pointer`` (``best.json``/``latest.json``: path, round, hash) naming
    exactly this round, which must be the chain's best scored (``best.json``) or last
    (``latest.json``) round. Without: the same file and pointer-hash checks where ``meta.json``
    exists (None when it does not), nothing about who wrote them. SignatureError when a check
    fails.
    """
    if not (folder / META_FILE).is_file():
        if verifier is not None:
            raise SignatureError(f"{folder} has no {META_FILE}: it cannot be verified")
        return None
    where = f"checkpoint {folder}"
    meta = read_meta(folder, what=where)
    root, round_ = folder.parent, meta["round"]
    link = Link(round_, folder, meta)
    in_its_run = (root / "round-0000").is_dir() and folder.name == round_folder_name(round_)
    if verifier is not None and in_its_run:
        links = verify_links(root, verifier=verifier, upto=None if pointer else round_)
        link = links[round_] if round_ < len(links) else link
        if pointer is not None:
            best = pointer[0].name == "best.json"
            audit = root.parent / AUDIT_FILE
            scores = score_claims(read_entries(audit)) if audit.is_file() else None
            want = expected_best(links, scores) if best else links[-1]
            if want is None or want.round != round_:
                raise SignatureError(
                    f"{pointer[0]} names round {pointer[1]} but the "
                    f"{'best scored' if best else 'last'} round of the verified chain is "
                    f"{want.round if want else 'none'}: the pointer was altered (give a round "
                    "folder to load another round on purpose)"
                )
    elif verifier is not None:
        checkpoint_signature(folder, verifier, what=where)
    check_round_files(link)
    if pointer is not None and pointer[1:] != (link.round, link.weights_sha256):
        raise SignatureError(
            f"{pointer[0]} names round {pointer[1]} with sha256 {pointer[2][:12]} but {folder} "
            f"holds round {link.round} with sha256 {link.weights_sha256[:12]}: the pointer or "
            "the checkpoint was altered"
        )
    return link
