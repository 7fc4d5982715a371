"""Fixtures for the site tests: a fake SuperLink that can answer HTTP 500 (fake_superlink.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_superlink import FakeSuperLink, serve_fake_superlink


@pytest.fixture
def fake_superlink() -> Iterator[FakeSuperLink]:
    """A fake Fleet API on a free 127.0.0.1 port for one test (see fake_superlink.py)."""
    with serve_fake_superlink() as fake:
        yield fake
