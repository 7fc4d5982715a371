"""ThreadDataLoader: order and seed, flattening, collation, errors, thread cleanup."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch

from fedmed.data import CacheDataset, ThreadDataLoader, collate


def _item(i: int) -> dict:
    return {
        "image": torch.full((1, 2, 2), float(i)),
        "image_meta": {"affine": torch.eye(4), "filename": f"p{i}"},
        "id": i,
    }


class Items:
    """A dataset of ``n`` small dict items; item ``fail_at`` raises."""

    def __init__(self, n: int, *, fail_at: int | None = None, delay: float = 0.0) -> None:
        self.n, self.fail_at, self.delay = n, fail_at, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if self.delay:
            time.sleep(self.delay)
        if index == self.fail_at:
            explode_on_purpose(index)
        return _item(index)


def explode_on_purpose(index: int) -> None:
    raise ValueError(f"item {index} could not be read")


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fedmed-loader"]


def _ids(loader: ThreadDataLoader) -> list[int]:
    return [int(i) for batch in loader for i in batch["id"]]


def test_batches_keep_order_and_collate_tensors_and_meta() -> None:
    batches = list(ThreadDataLoader(Items(5), batch_size=2))
    assert [b["id"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert batches[0]["image"].shape == (2, 1, 2, 2)
    assert torch.equal(batches[1]["image"][:, 0, 0, 0], torch.tensor([2.0, 3.0]))
    assert [m["filename"] for m in batches[0]["image_meta"]] == ["p0", "p1"]


def test_drop_last_and_len() -> None:
    loader = ThreadDataLoader(Items(5), batch_size=2, drop_last=True)
    assert len(loader) == 2 and len(list(loader)) == 2
    assert len(ThreadDataLoader(Items(5), batch_size=2)) == 3


def test_shuffle_order_is_fixed_by_seed_and_epoch() -> None:
    loader = ThreadDataLoader(Items(20), batch_size=3, shuffle=True, seed=1)
    epoch0, epoch0_again = _ids(loader), _ids(loader)
    loader.set_epoch(1)
    epoch1 = _ids(loader)
    other_seed = _ids(ThreadDataLoader(Items(20), batch_size=3, shuffle=True, seed=2))
    assert epoch0 == epoch0_again
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))
    assert epoch0 != epoch1 and epoch0 != other_seed and epoch0 != list(range(20))


def test_many_threads_give_the_same_order_as_one() -> None:
    one = _ids(ThreadDataLoader(Items(16, delay=0.002), batch_size=4, shuffle=True, seed=5))
    four = _ids(
        ThreadDataLoader(Items(16, delay=0.002), batch_size=4, shuffle=True, seed=5, num_threads=4)
    )
    assert one == four


def test_list_items_are_flattened_into_samples(cases, tiny) -> None:
    dataset = CacheDataset(
        cases[:3],
        [tiny.CountingLoad("image"), tiny.RandSamples("image", num_samples=4)],
        progress=False,
    )
    batches = list(ThreadDataLoader(dataset, batch_size=3, samples_per_item=4))
    assert len(batches) == 4 == len(ThreadDataLoader(dataset, batch_size=3, samples_per_item=4))
    assert [b["image"].shape[0] for b in batches] == [3, 3, 3, 3]
    assert [s for b in batches for s in b["sample"].tolist()] == [0, 1, 2, 3] * 3


def test_worker_exception_is_reraised_with_its_traceback() -> None:
    loader = ThreadDataLoader(Items(6, fail_at=3), batch_size=2)
    seen = []
    with pytest.raises(ValueError, match="item 3 could not be read") as excinfo:
        for batch in loader:
            seen.append(batch["id"].tolist())
    assert seen == [[0, 1]]
    assert any(entry.name == "explode_on_purpose" for entry in excinfo.traceback)
    time.sleep(0.05)
    assert _loader_threads() == []


def test_dropping_the_iterator_stops_its_thread() -> None:
    # Prepare
    loader = ThreadDataLoader(Items(200), batch_size=1, prefetch=1)
    iterator = iter(loader)
    next(iterator)
    assert len(_loader_threads()) == 1

    # Execute
    del iterator
    gc.collect()

    # Assert
    deadline = time.monotonic() + 2.0
    while _loader_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _loader_threads() == []


def test_breaking_out_of_a_for_loop_stops_the_thread() -> None:
    for _ in ThreadDataLoader(Items(100, delay=0.001), batch_size=1, num_threads=2):
        break
    gc.collect()
    deadline = time.monotonic() + 2.0
    while _loader_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _loader_threads() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")]


def test_device_moves_every_tensor() -> None:
    batch = next(iter(ThreadDataLoader(Items(2), batch_size=2, device="meta")))
    assert batch["image"].device.type == "meta"
    assert batch["image_meta"][0]["affine"].device.type == "meta"


def test_collate_stacks_arrays_numbers_and_lists_strings() -> None:
    batch = collate([{"a": np.zeros(3), "n": 1.5, "s": "x"}, {"a": np.ones(3), "n": 2.5, "s": "y"}])
    assert (
        batch["a"].shape == (2, 3)
        and batch["n"].tolist() == [1.5, 2.5]
        and batch["s"] == ["x", "y"]
    )
    ragged = collate([torch.zeros(2), torch.zeros(3)])
    assert isinstance(ragged, list) and len(ragged) == 2


def test_invalid_batch_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        ThreadDataLoader(Items(2), batch_size=0)
