"""Datasets that feed training: caching datasets, the threaded loader, the demo-data generator."""

from fedmed.data.cache import CacheDataset
from fedmed.data.loader import ThreadDataLoader, collate
from fedmed.data.persistent import PersistentDataset
from fedmed.data.smartcache import SmartCacheDataset

__all__ = [
    "CacheDataset",
    "PersistentDataset",
    "SmartCacheDataset",
    "ThreadDataLoader",
    "collate",
]
