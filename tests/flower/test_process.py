"""Flower processes: their environment, start with a log, health wait, stop of the whole tree."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import pytest

from fedmed.errors import FederationError
from fedmed.flower.process import (
    descendants,
    flower_env,
    start_process,
    stop_process,
    wait_for_health,
)


def test_flower_env_isolates_home_and_disables_egress(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    monkeypatch.delenv("FEDMED_FLWR_TELEMETRY", raising=False)

    env = flower_env(tmp_path / "home")

    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert (tmp_path / "home").is_dir()


def test_stop_process_stops_the_whole_process_group(tmp_path: Path) -> None:
    # Prepare: a parent that starts a child which ignores nothing and sleeps
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    log_file = tmp_path / "p.log"
    proc = start_process([sys.executable, "-c", script], env=dict(os.environ), log_file=log_file)
    deadline = time.monotonic() + 20
    while not log_file.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    child_pid = int(log_file.read_text().split()[0])

    # Execute
    code = stop_process(proc, timeout=5)

    # Assert: parent and child are gone
    assert code == -15
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        # the child may be a zombie of the (dead) parent until init reaps it
        if Path(f"/proc/{child_pid}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"child {child_pid} survived stop_process")


def test_stop_process_also_stops_descendants_in_their_own_session(tmp_path: Path) -> None:
    # Flower's executor and server app start their own session: killpg does not reach them.
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    log_file = tmp_path / "p.log"
    proc = start_process([sys.executable, "-c", script], env=dict(os.environ), log_file=log_file)
    deadline = time.monotonic() + 20
    while not log_file.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    child_pid = int(log_file.read_text().split()[0])
    assert child_pid in descendants(proc.pid)

    stop_process(proc, timeout=5)

    stat = Path(f"/proc/{child_pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_start_process_echo_copies_output_to_log_and_stream(tmp_path: Path) -> None:
    sink = io.StringIO()
    log_file = tmp_path / "echo.log"
    proc = start_process(
        [sys.executable, "-c", "print('hello')"], env=dict(os.environ), log_file=log_file, echo=sink
    )
    proc.wait(timeout=20)
    deadline = time.monotonic() + 5
    while "hello" not in sink.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.getvalue() == "hello\n"
    assert log_file.read_text() == "hello\n"


def test_wait_for_health_is_bounded(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(FederationError, match=r"did not answer /health within 1 s"):
        wait_for_health("127.0.0.1:9", ca_cert=None, timeout=1.0)
    assert time.monotonic() - start < 5


def test_wait_for_health_reports_an_exited_process(tmp_path: Path) -> None:
    log_file = tmp_path / "dead.log"
    proc = start_process(
        [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
        env=dict(os.environ),
        log_file=log_file,
    )
    proc.wait(timeout=20)
    with pytest.raises(FederationError, match=r"exited with code 3 while starting(.|\n)*boom"):
        wait_for_health("127.0.0.1:9", ca_cert=None, timeout=5, proc=proc, log_file=log_file)
