"""Datasets that feed training: caching datasets, the threaded loader, the demo-data generator.

The dataset classes import torch; they are loaded on first use so that torch-free tools
(``fedmed demo-data``, ``fedmed data check``) start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CacheDataset",
    "PersistentDataset",
    "SmartCacheDataset",
    "ThreadDataLoader",
    "collate",
]

_MODULE_OF = {
    "CacheDataset": "fedmed.data.cache",
    "PersistentDataset": "fedmed.data.persistent",
    "SmartCacheDataset": "fedmed.data.smartcache",
    "ThreadDataLoader": "fedmed.data.loader",
    "collate": "fedmed.data.loader",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'fedmed.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
