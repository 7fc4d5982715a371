"""App pinning at a site: the pin list, the FAB check, the wrapped Flower runtime, and the
site's refusal to start when Flower would not run the wrapper (drift simulated)."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fedmed.server.submit import build_fab

from fedmed.errors import FederationError, SecurityError
from fedmed.flower.pinning import (
    RUNTIME_MODULE,
    WRAPPED_COMMAND,
    AppRefused,
    check_fab,
    check_runtime_hooks,
    guard_runtime,
    install_wrapper,
    read_pins,
    verify_pinning,
    write_pins,
)


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
    # Fails loudly if a flwr upgrade moves what fedmed.flower.pinning wraps.
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


@pytest.fixture
def site_path(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A SuperNode environment with the site's wrapper first on PATH, and the wrapper."""
    wrapper = install_wrapper(tmp_path / "bin", tmp_path / "pins.txt")
    path = os.pathsep.join([str(wrapper.parent), str(Path(sys.executable).parent)])
    return {"PATH": path}, wrapper


def test_pinning_is_proven_when_the_wrapper_is_first_on_path(site_path) -> None:
    env, wrapper = site_path
    verify_pinning(env, wrapper)  # nothing raised: Flower will run the wrapper


def test_a_site_refuses_when_another_flwr_clientapp_comes_first_on_path(
    site_path, tmp_path: Path
) -> None:
    env, wrapper = site_path
    # Flower's own flwr-clientapp (this venv's bin) before the site's wrapper
    env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), str(wrapper.parent)])}

    with pytest.raises(SecurityError, match=r"flwr-clientapp on the SuperNode's PATH resolves to"):
        verify_pinning(env, wrapper)


def test_a_site_refuses_when_the_wrapper_is_not_on_path_at_all(site_path) -> None:
    _, wrapper = site_path
    with pytest.raises(SecurityError, match=r"resolves to None, not the site's wrapper"):
        verify_pinning({"PATH": str(wrapper.parent.parent)}, wrapper)


@pytest.mark.parametrize("hook", ["pull_task_input", "install_from_fab"])
def test_a_site_refuses_when_a_runtime_hook_is_missing(
    site_path, hook: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, wrapper = site_path
    monkeypatch.delattr(importlib.import_module(RUNTIME_MODULE), hook)

    with pytest.raises(SecurityError, match=rf"cannot be proven with flwr .*has no {hook}\(\)"):
        verify_pinning(env, wrapper)
    with pytest.raises(SecurityError, match=rf"has no {hook}\(\) to guard"):
        guard_runtime(Path("pins.txt"))  # the wrapper itself refuses too


def test_a_site_refuses_when_flower_no_longer_calls_the_hook_by_name(
    site_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, wrapper = site_path
    runtime = importlib.import_module(RUNTIME_MODULE)
    pull = runtime.pull_task_input

    def run_clientapp(*args: object, **kwargs: object) -> None:  # holds a bound reference
        pull(*args, **kwargs)

    monkeypatch.setattr(runtime, "run_clientapp", run_clientapp)
    with pytest.raises(SecurityError, match=r"does not call pull_task_input\(\) by name"):
        verify_pinning(env, wrapper)


def test_a_site_refuses_when_flower_launches_the_clientapp_by_another_command(
    site_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    env, wrapper = site_path
    monkeypatch.setitem(TASK_TYPE_TO_COMMAND, TaskType.CLIENT_APP, "/opt/flwr/bin/clientapp")

    with pytest.raises(SecurityError, match=r"launches the ClientApp as '/opt/flwr/bin/clientapp'"):
        verify_pinning(env, wrapper)


def test_a_site_refuses_on_an_untested_flower(site_path, monkeypatch: pytest.MonkeyPatch) -> None:
    env, wrapper = site_path
    monkeypatch.setattr("fedmed.flower.version.installed_flower_version", lambda: "1.99.0")

    with pytest.raises(FederationError, match=r"flwr 1\.99\.0 is installed but fedmed supports"):
        verify_pinning(env, wrapper)


def test_the_runtime_hooks_hold_on_the_installed_flower() -> None:
    runtime = check_runtime_hooks()
    assert runtime.__name__ == RUNTIME_MODULE
    assert WRAPPED_COMMAND == "flwr-clientapp"
