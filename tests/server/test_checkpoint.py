"""Checkpoints: atomic rounds, hash chain, latest/best, resume and damage detection."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fedmed.server.checkpoint import CheckpointStore

from fedmed.errors import ModelError


def _weights(value: float):
    return {"w": np.full((2, 2), value, np.float32), "n": np.array(3, np.int64)}


@pytest.fixture
def store(tmp_path):
    store = CheckpointStore(tmp_path)
    for r, score in enumerate([0.1, 0.5, 0.3]):
        store.save(
            r,
            _weights(r),
            metrics={"round": r},
            config_hash="cfg",
            score=score,
            server_state={"steps": np.array([r], np.int64)},
        )
    return store


def test_chain_links_each_round_to_its_parent(store):
    assert store.verify_chain() == [0, 1, 2]
    hashes = [store.load(r).hash for r in range(3)]
    assert store.load(0).parent_hash is None
    assert store.load(1).parent_hash == hashes[0]
    assert store.load(2).parent_hash == hashes[1]


def test_latest_and_best_pointers(store):
    latest = json.loads((store.root / "latest.json").read_text())
    best = json.loads((store.root / "best.json").read_text())
    assert latest["round"] == 2
    assert best["round"] == 1 and best["score"] == 0.5


def test_load_latest_restores_weights_and_server_state(store):
    ckpt = store.load_latest()
    assert ckpt.round == 2
    np.testing.assert_array_equal(ckpt.weights["w"], _weights(2)["w"])
    assert ckpt.weights["n"].dtype == np.int64 and ckpt.weights["n"].shape == ()
    assert int(ckpt.server_state["steps"][0]) == 2
    assert ckpt.meta["config_hash"] == "cfg" and ckpt.meta["metrics"] == {"round": 2}


def test_damaged_weights_are_detected(store):
    path = store.round_dir(2) / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="round-0002 is damaged: weights sha256"):
        store.load_latest()


def test_broken_chain_is_detected(store):
    meta_path = store.round_dir(1) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["parent_hash"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="chain is broken"):
        store.verify_chain()


def test_unfinished_temporary_round_is_ignored(store):
    (store.root / ".round-0003.tmp").mkdir()
    assert store.load_latest().round == 2


def test_saving_a_round_without_its_parent_is_refused(tmp_path):
    with pytest.raises(ModelError, match="round 4 is missing"):
        CheckpointStore(tmp_path).save(5, _weights(0), metrics={}, config_hash="c")


def test_empty_store_has_no_latest(tmp_path):
    assert CheckpointStore(tmp_path).load_latest() is None
