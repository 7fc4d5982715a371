"""SmartCacheDataset: a window of cached items, a fraction replaced per epoch in the background.

Semantics follow MONAI's ``SmartCacheDataset`` (Clara's "smart cache"): ``cache_num`` items
are cached; after each epoch :meth:`~SmartCacheDataset.update_cache` drops the
``ceil(cache_num * replace_rate)`` oldest items and appends replacements that worker threads
prepared during the epoch. fedmed's differences: the visiting order is fixed by ``seed`` (the
windows of every epoch are reproducible), and the replacements are built by threads of this
process, never by spawned processes (no pickling of the pipeline, no fork pitfalls).

Example:
    >>> with SmartCacheDataset(cases, pipeline, cache_num=8, replace_rate=0.25, seed=0) as ds:
    ...     for epoch in range(10):
    ...         train_one_epoch(ThreadDataLoader(ds, batch_size=2))
    ...         ds.update_cache()
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

import torch

from fedmed.data.prefix import apply_rest, rest_is_safe, split_transform
from fedmed.transforms.base import Compose

__all__ = ["SmartCacheDataset"]

logger = logging.getLogger(__name__)


class SmartCacheDataset:
    """A window of ``cache_num`` prefix outputs in RAM; a fraction is replaced per epoch.

    Args:
        data: the data items.
        transform: a Compose or sequence of callables; its deterministic prefix is cached.
        cache_num: items in the window (capped at ``len(data)``).
        replace_rate: fraction of the window replaced by each :meth:`update_cache`.
        num_init_workers: threads for the first window (default: ``num_replace_workers``).
        num_replace_workers: threads preparing replacements in the background.
        seed: fixes the order in which items enter the window.
        shuffle: visit ``data`` in a seeded random order (else in the given order).

    ``len(dataset)`` is ``cache_num``; ``dataset[i]`` runs the random rest on the i-th item of
    the current window. Use it as a context manager, or call :meth:`start` and
    :meth:`shutdown`; without :meth:`start`, :meth:`update_cache` builds replacements inline.
    """

    def __init__(
        self,
        data: Sequence[dict[str, Any]],
        transform: Compose | Sequence[Callable[[Any], Any]] | None,
        *,
        cache_num: int,
        replace_rate: float = 0.1,
        num_init_workers: int | None = None,
        num_replace_workers: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if cache_num < 1:
            raise ValueError(f"cache_num must be >= 1, got {cache_num}")
        if not 0.0 <= replace_rate <= 1.0:
            raise ValueError(f"replace_rate must be in [0, 1], got {replace_rate}")
        if num_replace_workers < 1:
            raise ValueError(f"num_replace_workers must be >= 1, got {num_replace_workers}")
        if not data:
            raise ValueError("SmartCacheDataset needs at least one data item")
        self.data = list(data)
        self.prefix, self.rest = split_transform(transform)
        self._safe_rest = rest_is_safe(self.rest)
        self.cache_num = min(cache_num, len(self.data))
        self.replace_num = min(
            math.ceil(self.cache_num * replace_rate), len(self.data) - self.cache_num
        )
        self.num_replace_workers = num_replace_workers
        if shuffle:
            generator = torch.Generator().manual_seed(seed)
            self._order = torch.randperm(len(self.data), generator=generator).tolist()
        else:
            self._order = list(range(len(self.data)))
        self._indices = self._order[: self.cache_num]
        self._next = self.cache_num % len(self.data)
        with ThreadPoolExecutor(num_init_workers or num_replace_workers) as pool:
            self._window: list[Any] = list(pool.map(self._build, self._indices))
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[Any]] = []
        self._pending_indices: list[int] = []

    def __len__(self) -> int:
        return self.cache_num

    def __getitem__(self, index: int) -> Any:
        window = self._window  # one read: update_cache swaps the whole list
        return apply_rest(self.rest, window[index], safe=self._safe_rest)

    @property
    def data_indices(self) -> list[int]:
        """Indices into ``data`` of the items in the current window, oldest first."""
        return list(self._indices)

    def start(self) -> None:
        """Start the background threads and begin preparing the next replacements."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.num_replace_workers, thread_name_prefix="fedmed-smartcache"
            )
            self._submit_replacements()

    def update_cache(self) -> None:
        """Swap in the prepared replacements (waiting for them if needed); call once per epoch."""
        if self.replace_num == 0:
            return
        if self._pool is None:
            indices = self._take_next()
            replacements = [self._build(i) for i in indices]
        else:
            indices = self._pending_indices
            replacements = [future.result() for future in self._pending]
        self._window = self._window[self.replace_num :] + replacements
        self._indices = self._indices[self.replace_num :] + indices
        logger.debug("smart cache replaced %d items: %s", len(indices), indices)
        if self._pool is not None:
            self._submit_replacements()

    def shutdown(self) -> None:
        """Stop the background threads (pending replacements are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._pending, self._pending_indices = [], []

    def __enter__(self) -> SmartCacheDataset:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def _build(self, index: int) -> Any:
        return self.prefix(self.data[index])

    def _take_next(self) -> list[int]:
        indices = []
        for _ in range(self.replace_num):
            indices.append(self._order[self._next])
            self._next = (self._next + 1) % len(self._order)
        return indices

    def _submit_replacements(self) -> None:
        if self.replace_num == 0 or self._pool is None:
            return
        self._pending_indices = self._take_next()
        self._pending = [self._pool.submit(self._build, i) for i in self._pending_indices]
