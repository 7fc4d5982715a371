"""Round checkpoints: safetensors weights + JSON metadata, a hash chain, ``latest`` and ``best``.

Layout under ``<out-dir>/checkpoints/``::

    round-0000/                 the initial global model (the chain's root)
        weights.safetensors     the full global state_dict (no pickle)
        server_state.safetensors  server-optimizer state (FedAdam/FedYogi), may be empty
        meta.json               {"round", "metrics", "config_hash", "parent_hash",
                                 "weights_sha256", "server_state_sha256", "time", "format"}
    round-0001/ ...
    latest.json                 {"round": r, "hash": ...} of the last complete round
    scores.json                 {"<round>": score}: each round's validation score (model
                                selection; a round is scored when the sites evaluate it)
    best.json                   the pointer to the best-scored round

A round is written into a temporary folder and renamed into place, so a folder named
``round-NNNN`` is always complete; :meth:`CheckpointStore.load_latest` verifies the hashes and
the chain link, so a restarted server continues from exactly that round's global weights. When
the run signs (``signed_by``), resume also checks every round's ``signature.json`` from round 0
(:func:`fedmed.security.chain.verify_links`): a checkpoint whose weights were replaced and whose
hashes were recomputed is refused with a SecurityError, never trained on.
The checkpoint's ``hash`` is the sha256 of its ``weights.safetensors``; ``parent_hash`` is the
previous round's hash (``None`` for round 0).

Example:
    >>> import numpy as np, tempfile
    >>> store = CheckpointStore(tempfile.mkdtemp())
    >>> info = store.save(0, {"w": np.zeros(2, np.float32)}, metrics={}, config_hash="c")
    >>> store.load_latest().round
    0
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmed.errors import ModelError, SecurityError
from fedmed.security.at_rest import checkpoint_key, read_arrays, write_arrays
from fedmed.security.chain import round_folder_name, verify_links
from fedmed.security.signing import SignatureError, Signer, Verifier

from .report import json_safe

__all__ = ["Checkpoint", "CheckpointStore"]

logger = logging.getLogger(__name__)

_FORMAT = "fedmed-checkpoint-1"
_WEIGHTS = "weights.safetensors"
_STATE = "server_state.safetensors"
_META = "meta.json"
_SCORES = "scores.json"


@dataclass(frozen=True)
class Checkpoint:
    """One loaded round: its weights, server state and metadata.

    Example:
        >>> Checkpoint(round=1, path=Path("r"), hash="h", parent_hash=None, weights={},
        ...            server_state={}, meta={}).round
        1
    """

    round: int
    path: Path
    hash: str
    parent_hash: str | None
    weights: dict[str, np.ndarray]
    server_state: dict[str, np.ndarray]
    meta: dict[str, Any]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(json_safe(payload), fh, indent=2, sort_keys=True, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)


def _contiguous(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.require(v, requirements="C") for k, v in arrays.items()}


class CheckpointStore:
    """Writes and reads round checkpoints under ``<out_dir>/checkpoints``.

    Example:
        >>> import tempfile
        >>> CheckpointStore(tempfile.mkdtemp()).load_latest() is None
        True
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.root = Path(out_dir) / "checkpoints"
        self.key = checkpoint_key()  # FEDMED_CHECKPOINT_KEY: AES-GCM at rest, else plain

    def round_dir(self, round_: int) -> Path:
        """The folder of round ``round_``."""
        return self.root / round_folder_name(round_)

    def rounds(self) -> list[int]:
        """Rounds with a complete folder, ascending."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            name = entry.name
            if entry.is_dir() and name.startswith("round-") and name[6:].isdigit():
                found.append(int(name[6:]))
        return sorted(found)

    def save(
        self,
        round_: int,
        weights: Mapping[str, np.ndarray],
        *,
        metrics: Mapping[str, Any],
        config_hash: str,
        server_state: Mapping[str, np.ndarray] | None = None,
        score: float | None = None,
        plan: Mapping[str, Any] | None = None,
    ) -> Checkpoint:
        """Write round ``round_`` atomically, update ``latest.json`` and, when ``score`` beats
        the best so far, ``best.json``; return the new checkpoint. ``plan``: the model's
        preprocessing (:meth:`fedmed.plan.PreprocessingPlan.to_metadata`'s ``plan`` block),
        recorded in ``meta.json`` so ``fedmed infer`` prepares images as the sites did."""
        self.root.mkdir(parents=True, exist_ok=True)
        parent = self._parent_hash(round_)
        final = self.round_dir(round_)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{round_folder_name(round_)}."))
        try:
            write_arrays(tmp / _WEIGHTS, _contiguous(weights), key=self.key)
            write_arrays(tmp / _STATE, _contiguous(server_state or {}), key=self.key)
            digest = _sha256(tmp / _WEIGHTS)
            meta = {
                "format": _FORMAT,
                "round": round_,
                "metrics": dict(metrics),
                "config_hash": config_hash,
                "parent_hash": parent,
                "weights_sha256": digest,
                "server_state_sha256": _sha256(tmp / _STATE),
                "score": score,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            if plan is not None:
                meta["plan"] = dict(plan)
            _write_json(tmp / _META, meta)
            if final.exists():  # a round re-run after a crash between save and latest.json
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        pointer = {"round": round_, "hash": digest, "score": score}
        _write_json(self.root / "latest.json", pointer)
        best = self.best_pointer()
        stale = any(r >= round_ for r in self.scores() if r != round_ or score is None)
        if stale or (best is not None and int(best.get("round", -1)) >= round_):
            # a round written again (a resume after its folder was deleted, or after a crash):
            # the scores of it and later rounds are gone with them; pick the best of the rest
            best = self._best_before(round_)
            if best is None:
                (self.root / "best.json").unlink(missing_ok=True)
            else:
                _write_json(self.root / "best.json", best)
        if score is not None:
            self.set_score(round_, score)
        logger.info("checkpoint round %d written to %s (sha256 %s)", round_, final, digest[:12])
        return Checkpoint(
            round_, final, digest, parent, dict(weights), dict(server_state or {}), meta
        )

    def _parent_hash(self, round_: int) -> str | None:
        if round_ == 0:
            return None
        previous = self.round_dir(round_ - 1) / _META
        if not previous.is_file():
            raise ModelError(
                f"cannot write checkpoint round {round_}: round {round_ - 1} is missing in "
                f"{self.root}: resume from the latest round or use a new out-dir"
            )
        return json.loads(previous.read_text())["weights_sha256"]

    def scores(self) -> dict[int, float]:
        """Validation score per round (``scores.json``, and ``meta.json`` scores of rounds
        written with one); the rounds model selection has scored so far."""
        found: dict[int, float] = {}
        for round_ in self.rounds():
            meta = json.loads((self.round_dir(round_) / _META).read_text())
            if isinstance(meta.get("score"), (int, float)):
                found[round_] = float(meta["score"])
        path = self.root / _SCORES
        if path.is_file():
            found.update({int(k): float(v) for k, v in json.loads(path.read_text()).items()})
        return found

    def set_score(self, round_: int, score: float) -> bool:
        """Record round ``round_``'s validation score (model selection, known only after the
        round: the sites score a global model when they receive it); ``best.json`` then points
        at the best-scored round. Returns whether that is ``round_``."""
        scores = self.scores()
        scores[round_] = float(score)
        _write_json(self.root / _SCORES, {str(k): v for k, v in sorted(scores.items())})
        best = self._best_of(scores)
        if best is not None:
            _write_json(self.root / "best.json", best)
        return best is not None and best["round"] == round_

    def _best_of(self, scores: Mapping[int, float]) -> dict[str, Any] | None:
        """The pointer to the first round with the highest finite score among ``scores``."""
        best: tuple[int, float] | None = None
        for round_, score in sorted(scores.items()):
            if math.isfinite(score) and (best is None or score > best[1]):
                best = (round_, score)
        if best is None:
            return None
        meta = json.loads((self.round_dir(best[0]) / _META).read_text())
        return {"round": best[0], "hash": meta["weights_sha256"], "score": best[1]}

    def _best_before(self, round_: int) -> dict[str, Any] | None:
        kept = {r: v for r, v in self.scores().items() if r < round_}
        _write_json(self.root / _SCORES, {str(k): v for k, v in sorted(kept.items())})
        return self._best_of(kept)

    def best_pointer(self) -> dict[str, Any] | None:
        """The content of ``best.json``, or None before any scored round."""
        path = self.root / "best.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def load(self, round_: int) -> Checkpoint:
        """Load and verify round ``round_``; ModelError names the folder if it is damaged."""
        folder = self.round_dir(round_)
        try:
            meta = json.loads((folder / _META).read_text())
            digest = _sha256(folder / _WEIGHTS)
            if digest != meta["weights_sha256"]:
                raise ModelError(
                    f"checkpoint {folder} is damaged: weights sha256 {digest[:12]} does not "
                    f"match meta.json ({meta['weights_sha256'][:12]}): delete the folder to "
                    "resume from the round before"
                )
            if _sha256(folder / _STATE) != meta["server_state_sha256"]:
                raise ModelError(
                    f"checkpoint {folder} is damaged: server_state.safetensors does not match "
                    "meta.json: delete the folder to resume from the round before"
                )
            weights = read_arrays(folder / _WEIGHTS, key=self.key)
            state = read_arrays(folder / _STATE, key=self.key)
        except (OSError, ValueError, KeyError) as err:
            raise ModelError(
                f"checkpoint {folder} cannot be read ({err}): delete the folder to resume "
                "from the round before"
            ) from err
        return Checkpoint(round_, folder, digest, meta["parent_hash"], weights, state, meta)

    def load_latest(self, *, signed_by: Signer | None = None) -> Checkpoint | None:
        """The last complete round, its files and chain link checked; None if none.

        ``signed_by``: the run signs its checkpoints with this signer, so every round from 0 to
        the last must carry a signature by its CA (without a CA: by its certificate) over
        exactly its ``meta.json``; SecurityError names the folder and the fix otherwise.
        """
        rounds = self.rounds()
        if not rounds:
            return None
        if signed_by is not None:
            self._verify_signatures(rounds[-1], Verifier.for_signer(signed_by))
        latest = self.load(rounds[-1])
        if latest.round > 0:
            before = self.round_dir(latest.round - 1) / _META
            if not before.is_file():
                raise ModelError(
                    f"checkpoint {latest.path} has no parent round {latest.round - 1}: the "
                    "checkpoint folder is incomplete; restore it or use a new out-dir"
                )
            expected = json.loads(before.read_text())["weights_sha256"]
            if latest.parent_hash != expected:
                raise ModelError(
                    f"checkpoint {latest.path} names parent {latest.parent_hash} but round "
                    f"{latest.round - 1} has hash {expected}: the chain is broken; restore the "
                    "folder or use a new out-dir"
                )
        return latest

    def _verify_signatures(self, last: int, verifier: Verifier) -> None:
        try:
            verify_links(self.root, verifier=verifier, upto=last)
        except SignatureError as err:
            raise SecurityError(
                f"cannot resume from {self.root}: {err}. This run signs its checkpoints, so it "
                "resumes only from a chain its own key signed: restore the folder from a backup, "
                "or start over in a new out-dir; if you know why a round fails (a crash right "
                f"after writing round {last} leaves it unsigned), delete that round's folder and "
                "every later one to resume from the round before it"
            ) from err

    def verify_chain(self) -> list[int]:
        """Check every round's hashes and parent links; return the rounds checked."""
        rounds = self.rounds()
        parent: str | None = None
        for expected_round, round_ in enumerate(rounds):
            if round_ != expected_round:
                raise ModelError(f"checkpoint round {expected_round} is missing in {self.root}")
            ckpt = self.load(round_)
            if ckpt.parent_hash != parent:
                raise ModelError(
                    f"checkpoint {ckpt.path} names parent {ckpt.parent_hash} but the round "
                    f"before has hash {parent}: the chain is broken"
                )
            parent = ckpt.hash
        return rounds
