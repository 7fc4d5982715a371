"""The SuperNode's idle poll cap, and the flwr internal it relies on (pinned)."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import time

import pytest

from fedmed.flower.fastpoll import (
    INFLATABLE_MODULE,
    PULL_BACKOFF,
    SUPERNODE_MODULE,
    CappedSleep,
    cap_supernode_sleep,
    shorten_pull_backoff,
)


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The seconds passed to time.sleep during the test (nothing actually sleeps)."""
    calls: list[float] = []
    monkeypatch.setattr(time, "sleep", calls.append)
    return calls


def test_capped_sleep_caps_and_passes_the_rest_of_time_through(slept) -> None:
    CappedSleep(0.05).sleep(3)
    CappedSleep(0.05).sleep(0.02)
    assert slept == [0.05, 0.02]
    assert CappedSleep(0.05).monotonic is time.monotonic


def test_flower_supernode_loop_sleeps_through_its_module_level_time(monkeypatch) -> None:
    module = importlib.import_module(SUPERNODE_MODULE)
    source = inspect.getsource(module)
    # The idle wait fedmed shortens: fails loudly if a flwr upgrade changes it.
    assert "time.sleep(3)" in source
    monkeypatch.setattr(module, "time", module.time)  # restored after the test

    cap_supernode_sleep(0.2)

    assert isinstance(module.time, CappedSleep) and module.time.cap == 0.2


def test_poll_interval_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match=r"poll interval 5.0 must be in \(0, 3\]"):
        cap_supernode_sleep(5.0)


def test_fastpoll_runs_flowers_supernode_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedmed.flower.fastpoll", "--poll-interval", "0.2", "--", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--superlink" in result.stdout


def test_short_waits_use_the_busy_cap_and_long_ones_the_poll_cap(slept) -> None:
    CappedSleep(3.0, busy_cap=0.01).sleep(0.5)  # the SuperNode's wait for the ClientApp reply
    CappedSleep(3.0, busy_cap=0.01).sleep(2.0)  # an idle poll: under the poll cap, unchanged
    assert slept == [0.01, 2.0]
    with pytest.raises(ValueError, match=r"busy wait 1.0 must be in \(0, 0.5\]"):
        cap_supernode_sleep(0.2, busy_s=1.0)


def test_pull_backoff_is_shortened_in_flowers_object_pulls() -> None:
    module = importlib.import_module(INFLATABLE_MODULE)
    functions = (module.pull_objects, module.pull_and_inflate_object_from_tree)
    saved = [dict(f.__kwdefaults__) for f in functions]
    # Flower's defaults, which the shortening replaces (fails if a flwr upgrade moves them)
    assert all(s["initial_backoff"] == 1 and s["backoff_cap"] == 10 for s in saved)
    try:
        shorten_pull_backoff()
        for function in functions:
            assert {k: function.__kwdefaults__[k] for k in PULL_BACKOFF} == PULL_BACKOFF
    finally:
        for function, defaults in zip(functions, saved, strict=True):
            function.__kwdefaults__.update(defaults)
