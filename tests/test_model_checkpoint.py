"""Checkpoints: exact round trip, plain safetensors without pickle, errors naming the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from fedmed.checkpoint import load_checkpoint, save_checkpoint
from fedmed.errors import ModelError


def _tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 2, 1),
    )


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    # Prepare
    model = _tiny_net(seed=3)
    model(torch.randn(2, 1, 8, 8))  # moves BatchNorm statistics and its int64 counter
    state = model.state_dict()
    state_extra = {**state, "half": torch.randn(3, dtype=torch.bfloat16)}
    metadata = {"round": 3, "dice": 0.81, "config": {"lr": 1e-3}, "sites": ["A", "B"]}
    # Execute
    path = save_checkpoint(tmp_path / "sub" / "ckpt.safetensors", state_extra, metadata)
    loaded = load_checkpoint(path)
    # Assert
    assert loaded.metadata == metadata
    assert loaded.state_dict.keys() == state_extra.keys()
    for key, value in state_extra.items():
        assert loaded.state_dict[key].dtype == value.dtype, key
        assert torch.equal(loaded.state_dict[key], value), key
    fresh = _tiny_net(seed=9)
    fresh.load_state_dict(load_checkpoint(save_checkpoint(path, model, {})).state_dict)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert list(path.parent.iterdir()) == [path]  # no temporary files left


def test_checkpoint_file_is_plain_safetensors_without_pickle(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.safetensors", _tiny_net(), {"round": 1})
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    data_len = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert len(raw) == 8 + header_len + data_len  # header + raw tensor bytes, nothing else
    assert json.loads(header["__metadata__"]["fedmed"]) == {"round": 1}
    assert b"\x80\x02" not in raw[:8] and not raw.startswith(b"PK")  # no pickle, no zip


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"checkpoint .*missing\.safetensors does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(ModelError, match=r"bad\.safetensors is not a readable safetensors"):
        load_checkpoint(bad)
    with pytest.raises(ModelError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "x.safetensors", _tiny_net(), {"when": object()})


def test_public_api_is_pinned() -> None:
    import fedmed.checkpoint as module

    assert sorted(module.__all__) == ["LoadedCheckpoint", "load_checkpoint", "save_checkpoint"]
    assert all(hasattr(module, name) for name in module.__all__)
