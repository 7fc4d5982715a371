"""Model selection on validation data: which round's global model is the best.

Each site evaluates the global model it receives on its own validation split before it trains
(federated evaluation: ``global-val-dice`` and ``global-val-n_cases`` in its reply). The
replies of round r + 1 therefore score the checkpoint of round r: the mean of the sites'
validation Dice weighted by their validation cases. The end-of-run evaluation scores the final
round the same way. The held-out set at the server is the study's test set: it is reported
every round and never used to choose a model.

With ``sites-per-round`` the score of a round comes from the sites sampled in the next one.

Example:
    >>> validation_score({"A": {"global-val-dice": 0.8, "global-val-n_cases": 3},
    ...                   "B": {"global-val-dice": 0.4, "global-val-n_cases": 1}})
    (0.7, 4)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["record_selection", "validation_score"]

logger = logging.getLogger(__name__)


class _ScoreStore(Protocol):
    def set_score(self, round_: int, score: float) -> bool: ...


class _ScoreAudit(Protocol):
    def record_score(self, round_: int, score: float) -> None: ...


def validation_score(
    sites: Mapping[str, Mapping[str, Any]], *, prefix: str = "global-val-"
) -> tuple[float | None, int]:
    """``(score, validation cases)`` of the sites' ``<prefix>dice``; ``(None, 0)`` if none."""
    total, cases = 0.0, 0
    for metrics in sites.values():
        dice = metrics.get(f"{prefix}dice")
        n = metrics.get(f"{prefix}n_cases", 1)
        if isinstance(dice, (int, float)) and math.isfinite(dice) and n and n > 0:
            total += float(dice) * int(n)
            cases += int(n)
    return (total / cases, cases) if cases else (None, 0)


def record_selection(
    store: _ScoreStore,
    record: dict[str, Any],
    scored_round: int,
    *,
    sites: Mapping[str, Mapping[str, Any]] | None = None,
    audit: _ScoreAudit | None = None,
) -> None:
    """Score ``scored_round`` from ``sites`` (default: the record's sites), note it in
    ``record["selection"]`` and the audit log, and let the checkpoint store move ``best``."""
    score, cases = validation_score(record.get("sites") or {} if sites is None else sites)
    if score is None:
        return
    if audit is not None:
        audit.record_score(scored_round, score)
    best = store.set_score(scored_round, score)
    record["selection"] = {
        "round": scored_round,
        "val-dice": score,
        "val-cases": cases,
        "best": best,
    }
    logger.info(
        "round %d's global model: validation Dice %.4f over %d cases%s",
        scored_round,
        score,
        cases,
        " (best so far)" if best else "",
    )
