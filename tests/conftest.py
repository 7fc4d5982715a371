"""Session-wide test setup: telemetry off, small thread counts for a 2-core machine."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo federation, generated once: ``site-A``, ``site-B``, ``site-C`` (3 cases
    each, 32x32x16 voxels, site-C with noisy labels) and ``holdout`` (2 cases)."""
    from fedmed.data.demo import generate_demo_federation

    root = tmp_path_factory.mktemp("demo") / "data"
    generate_demo_federation(root, sites=3, cases=3, seed=0, shape=(32, 32, 16), holdout=2)
    return root


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny nets run faster on one torch thread than on two contended ones; restored after.

    Use per module: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def short_ray_tmpdir() -> Iterator[Path]:
    """A short folder for RAY_TMPDIR, removed afterwards.

    Ray's Unix sockets live about 64 bytes below RAY_TMPDIR and the OS allows 107, so pytest's
    tmp folders (longer still under pytest-xdist's ``popen-gwN``) do not fit.
    """
    path = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower builds a ``Message`` with the run id of the task running in the process (a server
    app's); outside one, tests that build messages the server sends set it here."""
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_task_id", "_run_id", "_node_id")
    before = {name: getattr(TaskIdentity, name) for name in names}
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    for name, value in before.items():
        setattr(TaskIdentity, name, value)


@pytest.fixture(scope="session")
def reference_epsilon() -> Callable[[float, float, int, float], float]:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps by dp-accounting's RDP accountant:
    the independent reference every DP record fedmed reports is recomputed with."""
    import dp_accounting

    def epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
        accountant = dp_accounting.rdp.RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(
            sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        )
        accountant.compose(event, steps)
        return accountant.get_epsilon(delta)

    return epsilon
