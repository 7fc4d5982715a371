"""ThreadDataLoader: batches prepared by a background thread, optionally moved to a device.

Unlike ``torch.utils.data.DataLoader`` with workers, nothing is pickled or forked: the cached
items stay shared in this process and the random transforms run in threads (torch ops release
the GIL). Items that are lists (a crop with ``num_samples > 1``) are flattened into samples
before batching. The order is a function of ``seed`` and the epoch (:meth:`set_epoch`).
The random transforms' own draws are reproducible with ``num_threads=1`` (seed the pipeline
with ``Compose.set_random_state``); with more threads the items arrive in order but the
transforms' generators are shared, so which item gets which draw may vary.

Example:
    >>> loader = ThreadDataLoader(dataset, batch_size=2, shuffle=True, seed=0, device="cuda")
    >>> for epoch in range(3):
    ...     loader.set_epoch(epoch)
    ...     for batch in loader:
    ...         batch["image"].shape  # (2, 1, 96, 96, 96) on the GPU
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["ThreadDataLoader", "collate", "move_to_device"]

logger = logging.getLogger(__name__)

_END = object()
_POLL_S = 0.1


class _Dataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...


def collate(samples: Sequence[Any]) -> Any:
    """Batch samples: stack tensors (and arrays, numbers) of equal shape, keep the rest as lists.

    Dicts are collated key by key, so ``image``/``label`` become ``(B, C, ...)`` tensors; a
    key ending in ``_meta`` (``image_meta``) becomes the list of the samples' meta dicts.
    """
    first = samples[0]
    if isinstance(first, dict):
        return {
            key: [s[key] for s in samples]
            if key.endswith("_meta")
            else collate([s[key] for s in samples])
            for key in first
        }
    if isinstance(first, torch.Tensor) and _same_shape(samples):
        return torch.stack(list(samples))
    if isinstance(first, np.ndarray) and first.dtype != object and _same_shape(samples):
        return torch.as_tensor(np.stack(samples))
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return torch.tensor(samples)
    return list(samples)


def _same_shape(values: Sequence[Any]) -> bool:
    shape = values[0].shape
    return all(isinstance(v, type(values[0])) and v.shape == shape for v in values)


def move_to_device(batch: Any, device: torch.device, *, non_blocking: bool = True) -> Any:
    """Move every tensor in ``batch`` to ``device`` (pinned first when the target is CUDA)."""
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, non_blocking=non_blocking) for k, v in batch.items()}
    if isinstance(batch, list):
        return [move_to_device(v, device, non_blocking=non_blocking) for v in batch]
    return batch


class ThreadDataLoader:
    """Iterate over batches that a background thread prepares ahead (``prefetch`` batches).

    Args:
        dataset: anything with ``len`` and ``[i]`` (the fedmed caching datasets, a list).
        batch_size: samples per batch (after flattening list-returning items).
        shuffle: visit items in a random order drawn from ``seed`` and the epoch.
        seed: base seed of the order.
        num_threads: threads fetching items (running the random transforms) in parallel.
        prefetch: batches prepared ahead of the consumer.
        device: move batches there (``non_blocking``, from pinned memory for CUDA).
        drop_last: drop a last batch smaller than ``batch_size``.
        collate_fn: turns a list of samples into a batch (default :func:`collate`).
        samples_per_item: samples each item yields (for ``len()`` only; e.g. ``num_samples``).

    An exception in the background thread is re-raised by the iterating thread with its
    original traceback; dropping or closing the iterator stops the thread.
    """

    def __init__(
        self,
        dataset: _Dataset,
        *,
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        num_threads: int = 1,
        prefetch: int = 2,
        device: torch.device | str | None = None,
        drop_last: bool = False,
        collate_fn: Callable[[list[Any]], Any] = collate,
        samples_per_item: int = 1,
    ) -> None:
        for name, value in (
            ("batch_size", batch_size),
            ("num_threads", num_threads),
            ("prefetch", prefetch),
            ("samples_per_item", samples_per_item),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_threads = num_threads
        self.prefetch = prefetch
        self.device = torch.device(device) if device is not None else None
        self.drop_last = drop_last
        self.collate_fn = collate_fn
        self.samples_per_item = samples_per_item
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` on the next iteration (same seed and epoch: same order)."""
        self.epoch = epoch

    def order(self) -> list[int]:
        """The item indices this epoch visits, in order."""
        count = len(self.dataset)
        if not self.shuffle:
            return list(range(count))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(count, generator=generator).tolist()

    def __len__(self) -> int:
        samples = len(self.dataset) * self.samples_per_item
        if self.drop_last:
            return samples // self.batch_size
        return -(-samples // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        return _BatchIterator(self)


class _BatchIterator:
    """Consumer side: reads the queue; the producer thread holds no reference to it."""

    def __init__(self, loader: ThreadDataLoader) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=loader.prefetch)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=_produce,
            args=(loader, loader.order(), self._queue, self._stop),
            name="fedmed-loader",
            daemon=True,
        )
        self._thread.start()

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stop the producer thread and wait for it."""
        self._done = True
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(_POLL_S)

    def __del__(self) -> None:
        if not self._done:
            self.close()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error  # keeps __traceback__: the worker's frames appear when re-raised


def _produce(
    loader: ThreadDataLoader, order: list[int], out: queue.Queue[Any], stop: threading.Event
) -> None:
    def put(value: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(value, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    pool = ThreadPoolExecutor(loader.num_threads) if loader.num_threads > 1 else None
    try:
        items = _fetch(loader.dataset, order, pool, loader.num_threads * 2, stop)
        batch: list[Any] = []
        for item in items:
            batch.extend(item if isinstance(item, list) else [item])
            while len(batch) >= loader.batch_size:
                ready, batch = batch[: loader.batch_size], batch[loader.batch_size :]
                if not put(_finish(loader, ready)):
                    return
        if batch and not loader.drop_last and not put(_finish(loader, batch)):
            return
        put(_END)
    except BaseException as err:  # handed to the consumer, which re-raises it
        put(_Failure(err))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _fetch(
    dataset: _Dataset,
    order: list[int],
    pool: ThreadPoolExecutor | None,
    lookahead: int,
    stop: threading.Event,
) -> Iterator[Any]:
    if pool is None:
        for index in order:
            if stop.is_set():
                return
            yield dataset[index]
        return
    # Bounded lookahead keeps memory flat; results come back in order.
    indices = iter(order)
    pending = [pool.submit(dataset.__getitem__, i) for i in itertools.islice(indices, lookahead)]
    while pending and not stop.is_set():
        result = pending.pop(0).result()
        for index in itertools.islice(indices, 1):
            pending.append(pool.submit(dataset.__getitem__, index))
        yield result


def _finish(loader: ThreadDataLoader, samples: list[Any]) -> Any:
    batch = loader.collate_fn(samples)
    if loader.device is not None:
        batch = move_to_device(batch, loader.device)
    return batch
