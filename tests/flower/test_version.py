"""The tested flwr range, and every fedmed start refusing an untested Flower."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from fedmed.errors import FederationError
from fedmed.flower import version
from fedmed.flower.version import (
    SUPPORTED_SERIES,
    check_flower_version,
    installed_flower_version,
    supported,
)


@pytest.mark.parametrize("release", ["1.41.0", "1.41.7", "1.42.0"])
def test_releases_of_a_tested_series_are_supported(release: str) -> None:
    assert check_flower_version(release) == release


@pytest.mark.parametrize(
    "release", ["1.40.9", "1.43.0", "2.41.0", "1.41.1rc1", "1.41.0.dev3", "1.41"]
)
def test_anything_else_is_refused_naming_both_versions(release: str) -> None:
    assert not supported(release)
    with pytest.raises(
        FederationError,
        match=rf"flwr {release} is installed but fedmed supports flwr 1\.41\.x or 1\.42\.x only",
    ):
        check_flower_version(release)


def test_the_installed_flower_is_checked_by_default() -> None:
    assert check_flower_version() == installed_flower_version() == metadata.version("flwr")
    assert SUPPORTED_SERIES[0] == "1.41"  # what pyproject.toml installs


def test_a_missing_flower_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(version.metadata, "version", missing)
    with pytest.raises(FederationError, match=r"flwr is not installed: reinstall fedmed"):
        installed_flower_version()


@pytest.fixture
def untested_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(version, "installed_flower_version", lambda: "1.99.0")


@pytest.mark.parametrize("prog", ["fedmed-server", "fedmed-client", "fedmed-sim"])
def test_every_command_refuses_to_start_on_an_untested_flower(
    prog: str, untested_flower: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedmed.client.cli import main as client_main
    from fedmed.server.cli import main as server_main
    from fedmed.simulation.cli import main as sim_main

    missing = str(tmp_path / "missing.toml")  # the check comes before the config is read
    sim_config = str(Path(__file__).resolve().parents[2] / "configs" / "sim.toml")
    mains = {
        "fedmed-server": lambda: server_main(["--config", missing]),
        "fedmed-client": lambda: client_main(["--site", "A", "--config", missing]),
        "fedmed-sim": lambda: sim_main(["--config", sim_config, "--out", str(tmp_path)]),
    }

    code = mains[prog]()

    assert code == FederationError.exit_code
    assert f"{prog}: error: flwr 1.99.0 is installed" in capsys.readouterr().err


def test_the_server_app_refuses_to_run_on_an_untested_flower(untested_flower: None) -> None:
    from fedmed.server.app import make_server_app

    from fedmed.runsettings.settings import RunSettings

    app = make_server_app(RunSettings())
    with pytest.raises(FederationError, match=r"flwr 1\.99\.0 is installed"):
        app._main(None, None)  # Flower's registered main: refused before it reads anything


def test_a_sites_clientapp_wrapper_refuses_to_run_on_an_untested_flower(
    untested_flower: None, tmp_path: Path
) -> None:
    from fedmed.flower.pinning import clientapp_main

    with pytest.raises(FederationError, match=r"flwr 1\.99\.0 is installed"):
        clientapp_main(tmp_path / "pins.txt")
