"""The four console scripts exist and behave as documented from the start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script", ["fedmed", "fedmed-server", "fedmed-client", "fedmed-sim"])
def test_console_script_answers_help(script: str) -> None:
    result = subprocess.run(
        [str(BIN / script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_fedmed_turns_flower_telemetry_off_by_default() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLWR_TELEMETRY_ENABLED"}
    code = "import os, fedmed; print(os.environ['FLWR_TELEMETRY_ENABLED'])"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "0"


def test_server_and_client_are_installed_under_fedmed_not_top_level() -> None:
    import importlib.util

    assert importlib.util.find_spec("fedmed.server") is not None
    assert importlib.util.find_spec("fedmed.client") is not None
    site_packages = Path(importlib.util.find_spec("flwr").origin).parents[1]  # type: ignore[union-attr]
    assert not (site_packages / "server").exists()
    assert not (site_packages / "client").exists()
