"""Model selection on the sites' validation scores, never on the held-out test set."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fedmed.server.checkpoint import CheckpointStore
from fedmed.server.selection import record_selection, validation_score


def test_validation_score_weights_sites_by_their_validation_cases():
    sites = {
        "A": {"global-val-dice": 0.8, "global-val-n_cases": 3},
        "B": {"global-val-dice": 0.4, "global-val-n_cases": 1},
        "C": {"val-dice": 0.9},  # no federated evaluation: not counted
    }
    assert validation_score(sites) == (pytest.approx(0.7), 4)
    assert validation_score({}) == (None, 0)


def test_best_follows_validation_even_when_the_held_out_set_prefers_another_round(tmp_path):
    # Prepare: round 1 has the better held-out (test) Dice, round 2 the better validation Dice
    store = CheckpointStore(tmp_path)
    weights = {"w": np.zeros(2, np.float32)}
    for r, test_dice in enumerate([0.1, 0.9, 0.5]):
        store.save(r, weights, metrics={"holdout": {"dice": test_dice}}, config_hash="c")
    # Execute: the replies of rounds 2 and 3 score rounds 1 and 2
    for scored, dice in [(1, 0.6), (2, 0.7)]:
        record: dict = {"sites": {"A": {"global-val-dice": dice, "global-val-n_cases": 2}}}
        record_selection(store, record, scored)
    # Assert
    best = json.loads((store.root / "best.json").read_text())
    assert (best["round"], best["score"]) == (2, 0.7)
    assert record["selection"] == {"round": 2, "val-dice": 0.7, "val-cases": 2, "best": True}
