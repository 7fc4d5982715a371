"""What the ``fedmed-sim`` end-to-end tests share: their marks, a short run folder, a sim.toml
over the demo's folders, and one run of ``fedmed-sim`` with its console captured.

Example:
    >>> with short_folder("fsx-") as short:
    ...     config = sim_toml(short, demo_root, app='num-rounds = 1\\nmodel = "coplenet"\\n')
    ...     code, printed = run_sim(["--config", str(config)])
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from fedmed.simulation.cli import main

__all__ = ["E2E_MARKS", "run_sim", "short_folder", "sim_toml"]

E2E_MARKS = [
    pytest.mark.slow,
    pytest.mark.e2e,
    # Ray's worker machinery leaks /dev/null handles that the GC reports as ResourceWarning
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@contextlib.contextmanager
def short_folder(prefix: str) -> Iterator[Path]:
    """A new folder under /tmp, removed afterwards: Ray's socket paths under ``<folder>/ray``
    must stay below the OS's 107 bytes, which a pytest tmp_path can exceed."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sim_toml(
    folder: Path,
    demo_root: Path,
    *,
    app: str,
    sites: Sequence[str] = ("site-A", "site-B"),
    tables: str = "",
) -> Path:
    """``folder/sim.toml``: output in ``folder/out``, the demo's ``sites`` folders and its
    held-out set, the ``[app]`` lines ``app`` and any further ``tables`` (e.g. ``[sites]``)."""
    folders = ", ".join(f'"{demo_root / site}"' for site in sites)
    config = folder / "sim.toml"
    config.write_text(
        f'[sim]\nout = "{folder / "out"}"\nsites = {len(sites)}\n'
        f'[data]\nsource = "folders"\nfolders = [{folders}]\n'
        f'holdout = "{demo_root / "holdout"}"\n{tables}[app]\n{app}'
    )
    return config


def run_sim(argv: list[str]) -> tuple[int, str]:
    """``fedmed-sim argv``: its exit code and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(argv)
    return code, printed.getvalue()
