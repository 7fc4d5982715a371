"""App pinning at a site: the pin list, the FAB check, the wrapped Flower runtime (pinned)."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fedmed.client.pinning import (
    RUNTIME_MODULE,
    AppRefused,
    check_fab,
    guard_runtime,
    install_wrapper,
    installed_app_hash,
    read_pins,
    site_pins,
    write_pins,
)
from fedmed.server.submit import build_fab


def test_installed_app_hash_is_the_shim_fedmed_server_submits() -> None:
    digest = installed_app_hash()
    assert digest == build_fab().hash_str == hashlib.sha256(build_fab().content).hexdigest()


def test_site_pins_put_the_installed_app_first_without_duplicates() -> None:
    other = "ab" * 32
    assert site_pins([other, installed_app_hash(), other]) == [installed_app_hash(), other]
    assert site_pins([other], include_installed=False) == [other]


def test_pins_round_trip_and_ignore_comments(tmp_path: Path) -> None:
    path = write_pins(tmp_path / "pins.txt", ["ab" * 32, "cd" * 32])
    path.write_text(path.read_text() + "\n# a comment\n")
    assert read_pins(path) == {"ab" * 32, "cd" * 32}


def test_check_fab_accepts_a_pinned_app_and_refuses_a_changed_one(tmp_path: Path) -> None:
    fab = build_fab()
    pins = write_pins(tmp_path / "pins.txt", [fab.hash_str])

    assert check_fab(fab.content, pins) == fab.hash_str
    with pytest.raises(AppRefused, match=r"refuses app sha256 [0-9a-f]{64}: not in its pin list"):
        check_fab(fab.content + b"\0", pins)


@pytest.mark.parametrize("content", [None, "not-a-digest\n"], ids=["missing", "garbage"])
def test_an_unreadable_pin_list_refuses_everything(tmp_path: Path, content: str | None) -> None:
    pins = tmp_path / "pins.txt"
    if content is not None:
        pins.write_text(content)
    with pytest.raises(AppRefused, match=r"pin list .* is unreadable"):
        check_fab(build_fab().content, pins)


def test_guard_checks_before_flower_installs_and_after_the_task_was_pulled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = importlib.import_module(RUNTIME_MODULE)
    installed: list[bytes] = []
    # Restore Flower's functions after the test; record what would have been installed.
    monkeypatch.setattr(runtime, "pull_task_input", runtime.pull_task_input)
    monkeypatch.setattr(
        runtime, "install_from_fab", lambda content, **kw: installed.append(content)
    )
    fab = build_fab()
    guard_runtime(write_pins(tmp_path / "pins.txt", [fab.hash_str]))

    runtime.install_from_fab(fab.content, skip_prompt=True)
    with pytest.raises(AppRefused):
        runtime.install_from_fab(fab.content + b"x", skip_prompt=True)

    assert installed == [fab.content]


def test_flwr_clientapp_runtime_is_where_the_guard_expects_it() -> None:
    # Fails loudly if a flwr upgrade moves what fedmed.client.pinning wraps.
    runtime = importlib.import_module(RUNTIME_MODULE)
    source = inspect.getsource(runtime.run_clientapp)
    pulled = source.index("pull_task_input(client)")
    installing = source.index("install_from_fab(fab.content")
    # The check must run after the task was pulled (so an error reply goes back) and inside
    # the try whose except turns an exception into that reply.
    assert source.index("try:") < pulled < installing < source.index("except Exception")
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    assert "run_clientapp(" in inspect.getsource(flwr_clientapp)


def test_wrapper_script_runs_flowers_flwr_clientapp(tmp_path: Path) -> None:
    script = install_wrapper(tmp_path / "bin", tmp_path / "pins.txt")

    assert script.name == "flwr-clientapp" and os.access(script, os.X_OK)
    assert script.read_text().startswith(f"#!{sys.executable}\n")
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--runtime-api-address" in result.stdout
