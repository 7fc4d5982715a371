"""A site's privacy budget across runs: its ledger, the check before a round, the record after.

Under DP (the round's ``privacy`` record, :class:`~fedmed.security.dp.DpParams`) a site:

1. loads its :class:`~fedmed.security.accountant.PrivacyLedger` (``<cache-dir>/
   privacy-ledger.json``; without a cache-dir, as in simulation, it lives in the node's
   ``context.state`` for the run's duration);
2. builds the round's entry (record mode: the round's DP-SGD steps and sampling rate; site mode:
   one noised release) and asks :func:`~fedmed.security.accountant.may_train` whether its own
   budget (site config ``max-epsilon``, which always wins) and the run's (``dp-max-epsilon``)
   allow it; if not it refuses with :class:`~fedmed.security.accountant.PrivacyBudgetExhausted`,
   whose name the error reply carries, so the server stops asking it;
3. after training, writes the entry to the ledger *before* anything leaves the site, and
   reports the ``dp-*`` record (epsilon and the parameters that determine it).

Example:
    >>> budget = SiteBudget(context, cache_dir="/data/A/cache", max_epsilon=8.0)
    >>> entry = budget.check(params, entry, run=run_id)    # PrivacyBudgetExhausted if not
    >>> record = budget.spend(entry, params, run=run_id)   # {"dp-epsilon": ..., ...}
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fedmed.security.accountant import (
    LEDGER_FILE,
    LedgerEntry,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    may_train,
    round_record,
)
from fedmed.security.dp import DpParams

__all__ = ["SiteBudget"]

logger = logging.getLogger(__name__)

_STATE = "privacy-ledger"


class SiteBudget:
    """One site's ledger and budget (see the module docstring)."""

    def __init__(self, context: Context, *, cache_dir: str = "", max_epsilon: float = 0.0) -> None:
        self.context = context
        self.path = Path(cache_dir) / LEDGER_FILE if cache_dir else None
        self.max_epsilon = max_epsilon
        self.ledger = self._load()

    def _load(self) -> PrivacyLedger:
        if self.path is not None:
            return PrivacyLedger.load(self.path)
        record = self.context.state.config_records.get(_STATE)
        if record is None:
            return PrivacyLedger()
        return PrivacyLedger(LedgerEntry(**e) for e in json.loads(str(record["entries"])))

    def check(self, params: DpParams, entry: LedgerEntry, *, run: str) -> None:
        """PrivacyBudgetExhausted when ``entry`` would take the site or the run past a budget."""
        ok, reason = may_train(
            site_budget=self.max_epsilon,
            run_budget=params.max_epsilon,
            spent_after_next=self.ledger.epsilon_if(entry, delta=params.delta),
            run_spent_after_next=self.ledger.epsilon_if(
                entry, delta=params.delta, run=run, adjacency=params.adjacency
            ),
        )
        if not ok:
            logger.warning("privacy budget: %s", reason)
            raise PrivacyBudgetExhausted(reason)

    def spend(self, entry: LedgerEntry, params: DpParams, *, run: str) -> dict[str, float]:
        """Write ``entry`` to the ledger (durably, before the reply leaves) and return the
        numeric ``dp-*`` record of the run at this site."""
        self.ledger.add(entry)
        if self.path is not None:
            self.ledger.save(self.path)
        else:
            entries = json.dumps([asdict(e) for e in self.ledger.entries])
            self.context.state[_STATE] = ConfigRecord({"entries": entries})
        record: dict[str, Any] = round_record(
            self.ledger, run=run, delta=params.delta, adjacency=params.adjacency
        )
        return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}
