"""The simulation SuperLink's process tree is stopped: after a failed run and after Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedmed.simulation.engine import SiteResources, run_federation
from sim_harness import E2E_MARKS, short_folder

from fedmed.errors import FederationError
from fedmed.flower.process import descendants, process_alive
from fedmed.runsettings.settings import RunSettings

pytestmark = E2E_MARKS

TINY = ["--features", "4,8,16,32,64", "--patch-size", "32,32", "--local-steps", "1"]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with short_folder("fe-") as path:
        yield path


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if process_alive(pid)]


def test_failed_run_names_the_reason_and_leaves_no_process(demo_root, short_dir):
    before = set(descendants(os.getpid()))
    settings = RunSettings(
        num_rounds=1,
        min_sites=2,
        model_features="4,8,16,32,64",
        patch_size="32,32",
        out_dir=str(short_dir / "run"),
        data_dir=str(short_dir / "no-such-holdout"),
    )
    folders = [demo_root / "site-A", demo_root / "site-B"]
    with pytest.raises(FederationError, match=r"no-such-holdout.*not a folder"):
        run_federation(settings, folders, SiteResources(), workdir=short_dir)
    assert _alive(sorted(set(descendants(os.getpid())) - before)) == []
    assert "not a folder" in (short_dir / "run" / "simulation.log").read_text()


# a program that calls run_federation itself (as bench/simulation.py does), no handlers of its own
_LIBRARY_CALLER = """
import sys
from fedmed.runsettings.settings import RunSettings
from fedmed.simulation.engine import SiteResources, run_federation
site_a, site_b, holdout, out = sys.argv[1:]
settings = RunSettings(num_rounds=50, model_features="4,8,16,32,64", patch_size="32,32",
                       local_steps=1, data_dir=holdout, out_dir=out + "/runs/fedavg")
run_federation(settings, [site_a, site_b], SiteResources(), workdir=out)
"""


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_the_superlink_and_ray(demo_root, short_dir, how):
    out = short_dir / "out"
    if how == "ctrl-c":  # fedmed-sim at a terminal
        command = [
            str(Path(sys.executable).parent / "fedmed-sim"),
            "--data", str(demo_root / "site-A"), str(demo_root / "site-B"),
            "--holdout", str(demo_root / "holdout"),
            "--out", str(out),
            "--rounds", "50",
            *TINY,
        ]  # fmt: skip
    else:  # the library under `timeout`
        command = [sys.executable, "-c", _LIBRARY_CALLER, str(demo_root / "site-A"),
                   str(demo_root / "site-B"), str(demo_root / "holdout"), str(out)]  # fmt: skip
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # as at a terminal: pytest-xdist workers ignore SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        metrics = out / "runs" / "fedavg" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        # round 1 logged: the SuperLink, flwr-simulation and Ray's actors are all up
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        tree = descendants(proc.pid)
        commands = " ".join(Path(f"/proc/{p}/cmdline").read_text() for p in _alive(tree))
        assert "flower-superlink" in commands and "raylet" in commands
        proc.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # fedmed-sim exits 130 as after Ctrl-C; the library caller's uncaught KeyboardInterrupt
    # ends it the way Python ends one (by SIGINT), after the clean-up ran
    assert proc.returncode == (130 if how == "ctrl-c" else -signal.SIGINT), output
    assert _alive(tree) == []
