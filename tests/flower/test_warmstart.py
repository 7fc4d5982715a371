"""Warm start: the flwr-clientapp wrapper forks from a preloaded server, or runs cold."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmed.flower.pinning import install_wrapper


def _run(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=120, check=False
    )


def test_wrapper_runs_cold_when_no_warm_server_listens(tmp_path: Path) -> None:
    script = install_wrapper(tmp_path / "bin", tmp_path / "pins", warm_socket=tmp_path / "s.sock")

    result = _run(script)

    assert result.returncode == 0, result.stderr
    assert "--runtime-api-address" in result.stdout


@pytest.mark.slow
def test_wrapper_forks_from_the_warm_server_and_relays_output_and_exit_code(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "s.sock"
    log = tmp_path / "warm.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                sys.executable, "-m", "fedmed.flower.warmstart", str(sock),
                str(tmp_path / "pins"), "fedmed.client.app",
            ],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "warm start ready" not in log.read_text() and time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()
            time.sleep(0.2)
        script = install_wrapper(tmp_path / "bin", tmp_path / "pins", warm_socket=sock)

        start = time.monotonic()
        result = _run(script)
        seconds = time.monotonic() - start
        bad = subprocess.run(
            [str(script), "--no-such-flag"], capture_output=True, text=True, timeout=60
        )
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)

    assert result.returncode == 0, (result.stderr, log.read_text())
    assert "--runtime-api-address" in result.stdout  # the child's stdout is the caller's
    assert bad.returncode == 2 and "flwr-clientapp: error:" in bad.stderr  # exit code relayed
    assert "forked flwr-clientapp pid" in log.read_text()
    print(f"warm flwr-clientapp --help: {seconds:.2f} s")
