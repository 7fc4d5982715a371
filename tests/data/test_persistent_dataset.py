"""PersistentDataset: content-keyed, config-keyed, pickle-free, atomic, corrupt-safe, encrypted."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmed.data import PersistentDataset
from fedmed.errors import DataError, SecurityError
from fedmed.io.nifti import read_nifti, write_nifti
from fedmed.security.encryption import EncryptionKey


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDMED_CACHE_KEY", raising=False)


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir())


def test_second_dataset_reads_the_cache_without_running_the_prefix(cases, tiny, tmp_path) -> None:
    # Prepare
    first_load = tiny.CountingLoad("image")
    PersistentDataset(cases, [first_load, tiny.Scale("image", factor=3.0)], tmp_path).prepare(
        num_workers=2, progress=False
    )
    load = tiny.CountingLoad("image")

    # Execute
    dataset = PersistentDataset(cases, [load, tiny.Scale("image", factor=3.0)], tmp_path)
    images = [dataset[i]["image"] for i in range(len(dataset))]

    # Assert
    assert first_load.calls == len(cases) and load.calls == 0
    expected = torch.from_numpy(read_nifti(cases[2]["image"]).array)[None] * 3.0
    assert torch.equal(images[2], expected)
    assert dataset[2]["image_meta"]["filename"] == cases[2]["image"]


def test_rewritten_file_with_same_path_size_and_mtime_gives_new_data(
    own_cases, tiny, tmp_path
) -> None:
    # Prepare: cache, then overwrite case 0 with different voxels and restore its mtime
    cache = tmp_path / "cache"
    PersistentDataset(own_cases, [tiny.CountingLoad("image")], cache)[0]
    path = Path(own_cases[0]["image"])
    before = path.stat()
    volume = read_nifti(path)
    write_nifti(path, volume.array + 7.0, volume.affine)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns

    # Execute
    load = tiny.CountingLoad("image")
    image = PersistentDataset(own_cases, [load], cache)[0]["image"]

    # Assert
    assert load.calls == 1
    assert torch.allclose(image, torch.from_numpy(volume.array + 7.0)[None])


def test_changed_transform_parameter_invalidates_the_entry(cases, tiny, tmp_path) -> None:
    PersistentDataset(
        cases[:1], [tiny.CountingLoad("image"), tiny.Scale("image", factor=2.0)], tmp_path
    )[0]
    load = tiny.CountingLoad("image")
    dataset = PersistentDataset(cases[:1], [load, tiny.Scale("image", factor=5.0)], tmp_path)
    image = dataset[0]["image"]
    assert load.calls == 1
    assert torch.allclose(image, torch.from_numpy(read_nifti(cases[0]["image"]).array)[None] * 5.0)
    assert len(_entries(tmp_path)) == 2


def test_entries_are_safetensors_without_pickle_and_no_temp_files_remain(
    cases, tiny, tmp_path
) -> None:
    dataset = PersistentDataset(cases, [tiny.CountingLoad(("image", "label"))], tmp_path)
    dataset.prepare(num_workers=3, progress=False)
    entries = _entries(tmp_path)
    assert len(entries) == len(cases)
    assert all(p.name.endswith(".safetensors") and not p.name.startswith(".") for p in entries)
    for entry in entries:
        blob = entry.read_bytes()
        header_len = int.from_bytes(blob[:8], "little")
        assert b"fedmed-item/1" in blob[8 : 8 + header_len]
        assert b"\x80\x04\x95" not in blob  # pickle protocol 4 frame


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],
        lambda b: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + b[17:],
        lambda b: b"",
    ],
    ids=["truncated", "bad-json", "empty"],
)
def test_corrupt_entry_is_warned_about_deleted_and_rebuilt(
    cases, tiny, tmp_path, caplog, damage
) -> None:
    # Prepare
    PersistentDataset(cases[:1], [tiny.CountingLoad("image")], tmp_path)[0]
    (entry,) = _entries(tmp_path)
    entry.write_bytes(damage(entry.read_bytes()))
    load = tiny.CountingLoad("image")

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmed.data.persistent"):
        image = PersistentDataset(cases[:1], [load], tmp_path)[0]["image"]

    # Assert
    assert load.calls == 1
    assert f"cache entry {entry} is corrupt" in caplog.text and "rebuilding" in caplog.text
    assert torch.equal(image, torch.from_numpy(read_nifti(cases[0]["image"]).array)[None])
    assert _entries(tmp_path) == [entry] and entry.stat().st_size > 1000


def test_unwritable_cache_dir_raises_data_error_naming_it(cases, tiny, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=f"cache folder {blocker / 'cache'} is not writable"):
        PersistentDataset(cases, [tiny.CountingLoad("image")], blocker / "cache")


def test_encrypted_cache_round_trips_and_is_not_plaintext(cases, tiny, tmp_path) -> None:
    # Prepare
    key = EncryptionKey.generate()
    raw = np.ascontiguousarray(read_nifti(cases[0]["image"]).array).tobytes()

    # Execute
    PersistentDataset(cases[:1], [tiny.CountingLoad("image")], tmp_path, encryption_key=key)[0]
    load = tiny.CountingLoad("image")
    image = PersistentDataset(cases[:1], [load], tmp_path, encryption_key=key.to_text())[0]["image"]

    # Assert
    (entry,) = _entries(tmp_path)
    blob = entry.read_bytes()
    assert entry.name.endswith(".safetensors.enc") and blob.startswith(b"FMENC")
    assert raw[:64] not in blob and raw[1000:1064] not in blob and b"fedmed-item" not in blob
    assert load.calls == 0
    assert torch.equal(image, torch.from_numpy(read_nifti(cases[0]["image"]).array)[None])


def test_key_from_environment_encrypts(cases, tiny, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDMED_CACHE_KEY", EncryptionKey.generate().to_text())
    dataset = PersistentDataset(cases[:1], [tiny.CountingLoad("image")], tmp_path)
    dataset[0]
    assert dataset.encrypted and _entries(tmp_path)[0].read_bytes().startswith(b"FMENC")


def test_wrong_key_raises_security_error_instead_of_rebuilding(cases, tiny, tmp_path) -> None:
    old, new = EncryptionKey.generate(), EncryptionKey.generate()
    PersistentDataset(cases[:1], [tiny.CountingLoad("image")], tmp_path, encryption_key=old)[0]
    dataset = PersistentDataset(
        cases[:1], [tiny.CountingLoad("image")], tmp_path, encryption_key=new
    )
    with pytest.raises(
        SecurityError,
        match=rf"cache entry .* was encrypted with a different key \(fingerprint {old.fingerprint}"
        r".*set the site's cache key .* or clear the cache folder",
    ):
        dataset[0]
    assert len(_entries(tmp_path)) == 1


def test_tampered_encrypted_entry_is_rebuilt(cases, tiny, tmp_path, caplog) -> None:
    key = EncryptionKey.generate()
    PersistentDataset(cases[:1], [tiny.CountingLoad("image")], tmp_path, encryption_key=key)[0]
    (entry,) = _entries(tmp_path)
    blob = bytearray(entry.read_bytes())
    blob[-20] ^= 0xFF
    entry.write_bytes(bytes(blob))
    load = tiny.CountingLoad("image")
    with caplog.at_level(logging.WARNING):
        PersistentDataset(cases[:1], [load], tmp_path, encryption_key=key)[0]
    assert load.calls == 1 and "failed its authentication check" in caplog.text


def test_random_rest_runs_on_each_access(cases, tiny, tmp_path) -> None:
    dataset = PersistentDataset(
        cases[:1], [tiny.CountingLoad("image"), tiny.RandAddNoise("image")], tmp_path
    )
    assert not torch.equal(dataset[0]["image"], dataset[0]["image"])


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_tensors_read_from_the_cache_are_aligned(cases, tiny, tmp_path, encrypted) -> None:
    # misaligned views (e.g. behind an odd-sized header) fall off torch's vectorized kernels
    key = EncryptionKey.generate() if encrypted else None
    PersistentDataset(cases[:1], [tiny.CountingLoad("image")], tmp_path, encryption_key=key)[0]
    item = PersistentDataset(cases[:1], [tiny.CountingLoad("image")], tmp_path, encryption_key=key)[
        0
    ]
    assert item["image"].data_ptr() % 8 == 0
    assert item["image_meta"]["affine"].dtype == torch.float64
    assert item["image_meta"]["affine"].data_ptr() % 8 == 0


def test_keep_in_memory_reads_each_entry_from_disk_once(cases, tiny, tmp_path) -> None:
    # Prepare: a warm cache on disk
    key = EncryptionKey.generate()
    PersistentDataset(cases, [tiny.CountingLoad("image")], tmp_path, encryption_key=key).prepare(
        progress=False
    )
    load = tiny.CountingLoad("image")
    dataset = PersistentDataset(
        cases,
        [load, tiny.RandAddNoise("image")],
        tmp_path,
        encryption_key=key,
        keep_in_memory=True,
    )

    # Execute: load into RAM, then remove the disk cache
    dataset.prepare(num_workers=2, progress=False)
    for entry in _entries(tmp_path):
        entry.unlink()
    first, second = dataset[3]["image"], dataset[3]["image"]

    # Assert: served from RAM (no rebuild), random rest still applied per access
    assert load.calls == 0 and _entries(tmp_path) == []
    assert not torch.equal(first, second)
