"""fedmed.flower.liveness: the heartbeat interval a SuperNode declares, and its exit when Flower's
pull loop or heartbeat thread dies. Real ``flower-supernode`` processes against
``fake_superlink.py`` (a Fleet API that answers HTTP 500 on demand)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_superlink import NODE_ID, FakeSuperLink

from fedmed.flower.liveness import (
    EXIT_STOPPED_WORKING,
    GUARD_PREFIX,
    HEARTBEAT_MODULES,
    set_heartbeat_interval,
)
from fedmed.flower.process import flower_env, free_loopback_port

TIMEOUT = 120.0  # a cold flwr import takes seconds, minutes on a saturated machine


@pytest.fixture
def restore_heartbeat() -> Iterator[None]:
    modules = [importlib.import_module(name) for name in HEARTBEAT_MODULES]
    before = [m.HEARTBEAT_DEFAULT_INTERVAL for m in modules]
    yield
    for module, value in zip(modules, before, strict=True):
        module.HEARTBEAT_DEFAULT_INTERVAL = value


def test_set_heartbeat_interval_reaches_flowers_connection_and_sender(restore_heartbeat) -> None:
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    set_heartbeat_interval(12.5)
    assert fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == 12.5
    assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 12.5


@pytest.mark.parametrize("seconds", [9.9, 0.0, 1800.5])
def test_heartbeat_interval_outside_what_the_superlink_accepts_is_refused(
    seconds: float, restore_heartbeat
) -> None:
    with pytest.raises(ValueError, match=r"within \[10, 1800\] s"):
        set_heartbeat_interval(seconds)


def test_bounds_are_flowers() -> None:
    from flwr.common import constant

    from fedmed.flower import liveness

    assert liveness.MIN_HEARTBEAT_S == constant.HEARTBEAT_MIN_INTERVAL
    assert liveness.MAX_HEARTBEAT_S == constant.HEARTBEAT_MAX_INTERVAL


def _supernode(fake: FakeSuperLink, tmp_path: Path, heartbeat: float) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "fedmed.flower.liveness", "--heartbeat-interval", str(heartbeat),
        "--poll-interval", "0.2", "--", "--superlink", fake.address, "--insecure",
        "--port", str(free_loopback_port()),
    ]  # fmt: skip
    # A file, not a pipe: Flower's SuperExec child holds the pipe open after the SuperNode exits.
    with (tmp_path / "supernode.log").open("wb") as out:
        return subprocess.Popen(
            command,
            env=flower_env(tmp_path / "flwr-home"),
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _finish(proc: subprocess.Popen[bytes], tmp_path: Path) -> tuple[int, str]:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        log = (tmp_path / "supernode.log").read_text(errors="replace")
        pytest.fail(f"the SuperNode kept running without working:\n{log[-3000:]}")
    return proc.returncode, (tmp_path / "supernode.log").read_text(errors="replace")


@pytest.mark.slow
def test_supernode_exits_when_a_500_ends_its_pull_loop(
    fake_superlink: FakeSuperLink, tmp_path: Path
) -> None:
    fake_superlink.fail.add("pull-messages")
    code, out = _finish(_supernode(fake_superlink, tmp_path, 10.0), tmp_path)
    assert code == EXIT_STOPPED_WORKING, out[-3000:]
    assert f"{GUARD_PREFIX} Flower's pull loop ended" in out
    assert "500 Internal Server Error" in out  # Flower's own error line before it
    # it declared the configured interval, and deactivated itself before exiting
    assert [r.heartbeat_interval for r in fake_superlink.got("activate-node")] == [10.0]
    assert [r.node_id for r in fake_superlink.got("deactivate-node")] == [NODE_ID]


@pytest.mark.slow
def test_supernode_exits_when_a_500_kills_its_heartbeat_thread(
    fake_superlink: FakeSuperLink, tmp_path: Path
) -> None:
    fake_superlink.fail.add("send-node-heartbeat")
    started = time.monotonic()
    code, out = _finish(_supernode(fake_superlink, tmp_path, 25.0), tmp_path)
    assert code == EXIT_STOPPED_WORKING, out[-3000:]
    assert f"{GUARD_PREFIX} thread" in out and "died: HTTPStatusError: Server error '500" in out
    beats = fake_superlink.got("send-node-heartbeat")
    assert beats and {b.heartbeat_interval for b in beats} == {25.0}
    # (whether Flower's pull loop polled before the first heartbeat failed is a race: on a
    # loaded machine the heartbeat thread may die first; the guard stops the node either way)
    assert [r.node_id for r in fake_superlink.got("deactivate-node")] == [NODE_ID]
    assert time.monotonic() - started < TIMEOUT


@pytest.mark.slow
def test_a_working_supernode_keeps_running(fake_superlink: FakeSuperLink, tmp_path: Path) -> None:
    proc = _supernode(fake_superlink, tmp_path, 10.0)
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(fake_superlink.got("pull-messages")) < 5 and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "supernode.log").read_text()[-3000:]
            time.sleep(0.2)
        assert len(fake_superlink.got("pull-messages")) >= 5
        assert proc.poll() is None
    finally:
        proc.terminate()
        code, out = _finish(proc, tmp_path)
    assert GUARD_PREFIX not in out
    assert code != EXIT_STOPPED_WORKING
