"""The caching pipeline's public names: exported once, importable, documented."""

from __future__ import annotations

import importlib

import pytest

import fedmed.data
import fedmed.security

MODULES = [
    "fedmed.data.cache",
    "fedmed.data.loader",
    "fedmed.data.persistent",
    "fedmed.data.prefix",
    "fedmed.data.serialize",
    "fedmed.data.smartcache",
    "fedmed.security.encryption",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_all_names_exist_and_public_classes_have_docstrings(name: str) -> None:
    module = importlib.import_module(name)
    for public in module.__all__:
        value = getattr(module, public)
        if isinstance(value, type) or callable(value):
            assert value.__doc__, f"{name}.{public} has no docstring"


def test_package_exports() -> None:
    assert {
        "CacheDataset",
        "PersistentDataset",
        "SmartCacheDataset",
        "ThreadDataLoader",
        "collate",
    } <= set(fedmed.data.__all__)
    assert {"EncryptionKey", "WrongKeyError", "TamperedDataError", "load_key"} <= set(
        fedmed.security.__all__
    )
    for name in fedmed.data.__all__:
        assert getattr(fedmed.data, name) is not None
