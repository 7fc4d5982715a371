"""Checkpoints encrypted at rest with FEDMED_CHECKPOINT_KEY; hashes and signatures still check."""

from __future__ import annotations

import numpy as np
import pytest
from fedmed.server.checkpoint import CheckpointStore

from fedmed.errors import SecurityError
from fedmed.security.at_rest import read_arrays, write_arrays
from fedmed.security.chain import verify_checkpoints
from fedmed.security.encryption import EncryptionKey, TamperedDataError, WrongKeyError

WEIGHTS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array([4], np.int64)}


def test_sealed_file_round_trips_and_hides_the_values(tmp_path) -> None:
    key = EncryptionKey.generate()
    path = tmp_path / "weights.safetensors"

    write_arrays(path, WEIGHTS, key=key)
    loaded = read_arrays(path, key=key)

    assert path.read_bytes()[:5] == b"FMENC"
    assert WEIGHTS["w"].tobytes() not in path.read_bytes()
    np.testing.assert_array_equal(loaded["w"], WEIGHTS["w"])
    np.testing.assert_array_equal(loaded["n"], WEIGHTS["n"])


def test_wrong_key_missing_key_and_swapped_files_are_refused(tmp_path) -> None:
    key = EncryptionKey.generate()
    write_arrays(tmp_path / "weights.safetensors", WEIGHTS, key=key)

    with pytest.raises(WrongKeyError):
        read_arrays(tmp_path / "weights.safetensors", key=EncryptionKey.generate())
    with pytest.raises(SecurityError, match="set FEDMED_CHECKPOINT_KEY"):
        read_arrays(tmp_path / "weights.safetensors", key=None)
    (tmp_path / "weights.safetensors").rename(tmp_path / "server_state.safetensors")
    with pytest.raises(TamperedDataError):
        read_arrays(tmp_path / "server_state.safetensors", key=key)


def test_checkpoint_store_encrypts_with_the_environment_key(tmp_path, monkeypatch) -> None:
    key = EncryptionKey.generate()
    monkeypatch.setenv("FEDMED_CHECKPOINT_KEY", key.to_text())
    store = CheckpointStore(tmp_path)
    store.save(0, WEIGHTS, metrics={}, config_hash="c")
    store.save(1, {k: v + 1 for k, v in WEIGHTS.items()}, metrics={}, config_hash="c")

    latest = CheckpointStore(tmp_path).load_latest()

    assert (store.round_dir(1) / "weights.safetensors").read_bytes()[:5] == b"FMENC"
    assert latest is not None and latest.round == 1
    np.testing.assert_array_equal(latest.weights["w"], WEIGHTS["w"] + 1)
    assert verify_checkpoints(store.root) == ([0, 1], [])  # no key needed to verify
    monkeypatch.delenv("FEDMED_CHECKPOINT_KEY")
    with pytest.raises(SecurityError, match="is encrypted"):
        CheckpointStore(tmp_path).load_latest()


def test_plain_checkpoints_stay_readable_without_a_key(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("FEDMED_CHECKPOINT_KEY", raising=False)
    store = CheckpointStore(tmp_path)
    store.save(0, WEIGHTS, metrics={}, config_hash="c")

    assert (store.round_dir(0) / "weights.safetensors").read_bytes()[:5] != b"FMENC"
    np.testing.assert_array_equal(store.load(0).weights["w"], WEIGHTS["w"])
