"""Checkpoints: atomic rounds, hash chain, latest/best, resume (signatures checked when the
run signs) and damage detection."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fedmed.server.checkpoint import CheckpointStore

from fedmed.errors import ModelError, SecurityError
from fedmed.security.chain import sign_checkpoint
from fedmed.security.pki import write_pki
from fedmed.security.signing import Signer


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


# -- resume of a signed run -----------------------------------------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    write_pki(out, server_hosts=["localhost"], sites=[])
    return out


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("other")
    write_pki(out, server_hosts=["localhost"], sites=[])
    return out


def _signed_store(root, certs, rounds=3):
    store = CheckpointStore(root)
    signer = Signer.from_dir(certs)
    for r in range(rounds):
        ckpt = store.save(r, _weights(r), metrics={"round": r}, config_hash="cfg", score=r / 10)
        sign_checkpoint(ckpt.path, signer)
    return store, signer


def _replace_weights(store, round_, value):
    """What an attacker with write access does: new weights, meta.json hashes recomputed."""
    folder = store.round_dir(round_)
    other = CheckpointStore(folder.parent.parent / "scratch")
    evil = other.save(0, _weights(value), metrics={}, config_hash="cfg")
    (folder / "weights.safetensors").write_bytes((evil.path / "weights.safetensors").read_bytes())
    meta = json.loads((folder / "meta.json").read_text())
    meta["weights_sha256"] = evil.hash
    (folder / "meta.json").write_text(json.dumps(meta))


def test_resume_of_a_signed_run_loads_the_verified_last_round(tmp_path, certs):
    store, signer = _signed_store(tmp_path, certs)

    latest = store.load_latest(signed_by=signer)

    assert latest.round == 2
    np.testing.assert_array_equal(latest.weights["w"], _weights(2)["w"])


def test_resume_refuses_replaced_weights_whose_hash_was_recomputed(tmp_path, certs):
    # Prepare: the plain hash check passes, only the signature can tell
    store, signer = _signed_store(tmp_path, certs)
    _replace_weights(store, 2, 99.0)
    assert store.load_latest().round == 2

    # Execute + Assert
    with pytest.raises(
        SecurityError, match=r"cannot resume from .*round-0002.*does not cover"
    ) as err:
        store.load_latest(signed_by=signer)
    assert "restore the folder from a backup" in str(err.value)
    assert "new out-dir" in str(err.value)


@pytest.mark.parametrize("round_", [0, 2], ids=["first", "last"])
def test_resume_refuses_a_round_stripped_of_its_signature(tmp_path, certs, round_):
    store, signer = _signed_store(tmp_path, certs)
    (store.round_dir(round_) / "signature.json").unlink()

    with pytest.raises(SecurityError, match=rf"round {round_} .*signature\.json is missing"):
        store.load_latest(signed_by=signer)


def test_resume_refuses_a_chain_re_signed_by_another_key(tmp_path, certs, other_certs):
    # Prepare: an attacker replaces the last round and signs it with a key of their own
    store, signer = _signed_store(tmp_path, certs)
    _replace_weights(store, 2, 99.0)
    sign_checkpoint(store.round_dir(2), Signer.from_dir(other_certs))
    pinned = Signer(signer.key, signer.certificate_pem)  # a signing folder without ca.pem

    # Execute + Assert
    with pytest.raises(SecurityError, match="that the federation's CA did not issue"):
        store.load_latest(signed_by=signer)
    with pytest.raises(SecurityError, match="not the one this run signs with"):
        store.load_latest(signed_by=pinned)


def test_best_pointer_is_recomputed_when_its_round_is_written_again(tmp_path):
    # Prepare: round 2 was the best, then its folder was deleted to resume from round 1
    store = CheckpointStore(tmp_path)
    for r, score in enumerate([0.1, 0.5, 0.9]):
        store.save(r, _weights(r), metrics={}, config_hash="c", score=score)
    shutil.rmtree(store.round_dir(2))

    # Execute: round 2 again, with a lower score
    again = store.save(2, _weights(7), metrics={}, config_hash="c", score=0.3)

    # Assert: best.json names round 1, which exists with that hash
    assert store.best_pointer() == {"round": 1, "hash": store.load(1).hash, "score": 0.5}
    assert json.loads((store.root / "latest.json").read_text())["hash"] == again.hash
