"""``fedmed-sim --ray-address``: the simulated sites run on an existing Ray cluster.

The cluster is a real ``ray start --head --block`` on 127.0.0.1 that this test starts in its
own process group and stops by that group's id (never ``ray stop``, which kills by name).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmed.flower.process import descendants, process_alive

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(short_ray_tmpdir: Path) -> Iterator[tuple[str, list[int]]]:
    """A Ray head node on 127.0.0.1 with 2 CPUs; yields (address, its processes)."""
    port = _free_port()
    processes: list[int] = []
    log = (short_ray_tmpdir / "head.log").open("wb")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard",
         "false", "--temp-dir", str(short_ray_tmpdir / "cluster")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline and head.poll() is None:
            text = (short_ray_tmpdir / "head.log").read_text(errors="replace")
            if "Ray runtime started" in text:
                break
            time.sleep(0.5)
        assert head.poll() is None and "Ray runtime started" in text, text[-2000:]
        processes = [head.pid, *descendants(head.pid)]
        yield f"127.0.0.1:{port}", processes
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=30)
        log.close()
    # stopping the group stopped the whole cluster (GCS, raylet, workers)
    time.sleep(1.0)
    assert [p for p in processes if process_alive(p)] == []


def test_the_sites_run_on_an_existing_ray_cluster(demo_root, short_ray_tmpdir, ray_head):
    address, cluster = ray_head
    out = short_ray_tmpdir / "out"
    command = [
        str(BIN / "fedmed-sim"),
        "--data", str(demo_root / "site-A"), str(demo_root / "site-B"),
        "--holdout", str(demo_root / "holdout"),
        "--out", str(out), "--rounds", "1",
        "--features", "4,8,16,32,64", "--patch-size", "32,32", "--local-steps", "1",
        "--ray-address", address, "--verbose",
    ]  # fmt: skip
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(command, capture_output=True, text=True, timeout=480, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "[fedavg] round 1:" in output
    # Ray joined the cluster instead of starting its own, and the cluster outlived the run
    log = (out / "runs" / "fedavg" / "simulation.log").read_text(errors="replace")
    assert "Connecting to existing Ray cluster" in log or address in log, log[-3000:]
    assert process_alive(cluster[0])
