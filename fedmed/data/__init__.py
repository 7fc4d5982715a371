"""Datasets that feed training: caching datasets, the threaded loader, the demo-data generator."""
