"""A site's state of a run: kept per run identity, discarded when it does not fit the model."""

from __future__ import annotations

import logging

import numpy as np
from fedmed.client.local_state import StateStore, fits_model
from flwr.app import Context, RecordDict

from fedmed.siteround import SiteState

RUN_A, RUN_B = "aa" * 32, "bb" * 32
MODEL = {"bn.running_mean": np.zeros(4, np.float32), "w": np.zeros((2, 2), np.float32)}


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_state_is_kept_per_run_and_survives_a_restart(tmp_path):
    store = StateStore(_context(), cache_dir=tmp_path)
    store.save(SiteState(RUN_A, norm={"bn.running_mean": np.ones(4, np.float32)}, samples=8.0))
    # a fresh process (new context) finds it on disk
    loaded = StateStore(_context(), cache_dir=tmp_path).load(RUN_A, reference=MODEL)
    assert loaded.samples == 8.0 and np.array_equal(loaded.norm["bn.running_mean"], np.ones(4))
    # another run never starts from it: today FedBN layers leaked into every later run
    other = StateStore(_context(), cache_dir=tmp_path).load(RUN_B, reference=MODEL)
    assert other.norm == {} and other.samples == 0.0


def test_a_state_that_does_not_fit_the_model_is_discarded_with_a_warning(tmp_path, caplog):
    store = StateStore(_context(), cache_dir=tmp_path)
    store.save(SiteState(RUN_A, norm={"bn.running_mean": np.ones(8, np.float32)}))
    with caplog.at_level(logging.WARNING):
        loaded = StateStore(_context(), cache_dir=tmp_path).load(RUN_A, reference=MODEL)
    assert loaded.norm == {}
    assert "does not fit this round's model" in caplog.text and "shape (8,)" in caplog.text


def test_fits_model_names_the_first_mismatch():
    assert fits_model(SiteState(RUN_A, control={"w": np.zeros((2, 2))}), MODEL) is None
    assert "not in the model" in fits_model(SiteState(RUN_A, personal={"x": np.zeros(1)}), MODEL)
