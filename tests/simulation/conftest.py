"""A pooled demo folder (one site of 8 patients), generated once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pooled_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pooled/site-A``: 8 small phantoms (32x32x16), one patient each, no held-out set."""
    from fedmed.data.demo import generate_demo_federation

    root = tmp_path_factory.mktemp("pooled")
    (folder,) = generate_demo_federation(
        root, sites=1, cases=8, seed=3, shape=(32, 32, 16), holdout=0
    )
    return folder
