"""CacheDataset: the deterministic prefix run once per item, its results kept in RAM.

Semantics follow MONAI's ``CacheDataset`` (``cache_rate``, ``num_workers``); fedmed adds a
memory bound checked before the build, a parallel build with a progress bar, and no copy per
access when the random rest is made of fedmed transforms (see :mod:`fedmed.data.prefix`).

Example:
    >>> pipeline = Compose([LoadImaged(("image", "label")), ScaleIntensityRanged("image", ...),
    ...                     RandCropByPosNegLabeld(("image", "label"), num_samples=4, ...)])
    >>> dataset = CacheDataset(cases, pipeline, cache_rate=1.0, num_workers=4)
    >>> samples = dataset[0]  # a list of 4 dicts: the crop returns num_samples items
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from fedmed.data.prefix import (
    apply_rest,
    item_nbytes,
    rest_is_safe,
    split_transform,
)
from fedmed.errors import DataError
from fedmed.transforms.base import Compose

__all__ = ["CacheDataset", "available_memory_bytes"]

logger = logging.getLogger(__name__)

_GIB = 1024**3
# Python objects, allocator slack and the transient copies during the build.
_OVERHEAD = 1.1


def available_memory_bytes() -> int:
    """RAM available for new allocations: ``MemAvailable`` from /proc/meminfo, else sysconf."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62  # unknown platform: do not refuse


class CacheDataset:
    """Run the deterministic prefix of ``transform`` once per item and keep the results in RAM.

    Args:
        data: the data items (dicts of file paths and values), e.g. from an MSD ``dataset.json``.
        transform: a :class:`~fedmed.transforms.base.Compose` or a sequence of callables; its
            prefix (up to the first random or non-fedmed callable) is cached, the rest runs on
            every access.
        cache_rate: fraction of items (from the start of ``data``) to cache; the others run the
            whole pipeline on access.
        num_workers: threads for the build (NIfTI decoding and torch ops release the GIL).
        max_memory_bytes: refuse to build when the estimated cache exceeds this; defaults to
            90% of the RAM available now.
        progress: show a tqdm progress bar on stderr during the build.

    ``dataset[i]`` returns a dict, or a list of dicts when the rest ends in a transform with
    ``num_samples > 1`` (:class:`~fedmed.data.loader.ThreadDataLoader` flattens it).

    Example:
        >>> dataset = CacheDataset(cases, pipeline, cache_rate=0.5, num_workers=2, progress=False)
        >>> len(dataset), dataset.cached_count
        (10, 5)
    """

    def __init__(
        self,
        data: Sequence[dict[str, Any]],
        transform: Compose | Sequence[Callable[[Any], Any]] | None,
        *,
        cache_rate: float = 1.0,
        num_workers: int | None = None,
        max_memory_bytes: int | None = None,
        progress: bool = True,
    ) -> None:
        if not 0.0 <= cache_rate <= 1.0:
            raise ValueError(f"cache_rate must be in [0, 1], got {cache_rate}")
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 or None, got {num_workers}")
        self.data = list(data)
        self.prefix, self.rest = split_transform(transform)
        self._safe_rest = rest_is_safe(self.rest)
        self.cache_rate = cache_rate
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        self.cached_count = int(len(self.data) * cache_rate)
        self._cache: list[Any] = self._build(max_memory_bytes, progress)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            index += len(self.data)
        if not 0 <= index < len(self.data):
            raise IndexError(f"index {index} out of range for {len(self.data)} items")
        if index < self.cached_count:
            return apply_rest(self.rest, self._cache[index], safe=self._safe_rest)
        return self.rest(self.prefix(self.data[index]))

    @property
    def cache_nbytes(self) -> int:
        """Bytes of tensors and arrays held by the cache."""
        return sum(item_nbytes(item) for item in self._cache)

    def _build(self, max_memory_bytes: int | None, progress: bool) -> list[Any]:
        count = self.cached_count
        if count == 0:
            return []
        bar = tqdm(total=count, desc="caching", unit="item", disable=not progress, leave=False)
        workers = min(self.num_workers, count)
        # The first ``workers`` items start at once; the rest are queued only after the bound
        # is checked on the first result, so a refusal builds at most ``workers`` items.
        with bar, ThreadPoolExecutor(workers, thread_name_prefix="fedmed-cache") as pool:
            futures = [pool.submit(self.prefix, item) for item in self.data[:workers]]
            self._check_memory(item_nbytes(futures[0].result()), count, max_memory_bytes)
            futures += [pool.submit(self.prefix, item) for item in self.data[workers:count]]
            results: list[Any] = []
            for future in futures:
                results.append(future.result())
                bar.update()
        logger.info("cached %d items (%.1f MiB)", count, sum(map(item_nbytes, results)) / 2**20)
        return results

    def _check_memory(self, first_bytes: int, count: int, limit: int | None) -> None:
        needed = int(first_bytes * count * _OVERHEAD)
        source = "the max_memory_bytes limit"
        if limit is None:
            limit = int(available_memory_bytes() * 0.9)
            source = "90% of the RAM available"
        if needed <= limit:
            return
        fitting = max(
            0.0, math.floor(100 * limit / (first_bytes * _OVERHEAD) / len(self.data)) / 100
        )
        raise DataError(
            f"caching {count} items needs about {needed / _GIB:.2f} GiB (first item "
            f"{first_bytes / 2**20:.1f} MiB x {count} + {(_OVERHEAD - 1) * 100:.0f}% overhead) "
            f"but {source} is {limit / _GIB:.2f} GiB; lower cache_rate to {fitting:.2f} or "
            "less, or use PersistentDataset (cache on disk) or SmartCacheDataset (a window)"
        )
