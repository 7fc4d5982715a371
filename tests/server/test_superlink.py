"""The SuperLink command line and the app shim, without starting Flower."""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import pytest
from fedmed.server.submit import build_fab, default_run_config, fab_files, submit_run
from fedmed.server.superlink import public_limit_flags, superlink_command

from fedmed.config import ServerConfig
from fedmed.errors import ConfigError


def _server_config(tmp_path: Path, *, insecure: bool = False) -> ServerConfig:
    certs = tmp_path / "certs"
    return ServerConfig(
        host="0.0.0.0",
        port=9123,
        state_dir=tmp_path / "state",
        ca_cert=None if insecure else certs / "ca.pem",
        server_cert=None if insecure else certs / "server.pem",
        server_key=None if insecure else certs / "server.key",
        insecure=insecure,
        min_sites=1,
        sites={},
        wait_for_sites_s=1.0,
        run_timeout_s=1.0,
        startup_timeout_s=1.0,
        stream_logs=False,
        control_port=9124,
    )


def test_superlink_command_turns_on_tls_auth_and_persistent_state(tmp_path: Path) -> None:
    command = superlink_command(_server_config(tmp_path))

    assert command[:3] == [sys.executable, "-m", "fedmed.flower.gateway"]
    gateway, flower = command[: command.index("--")], command[command.index("--") + 1 :]
    assert gateway[3:7] == ["--public-host", "0.0.0.0", "--public-port", "9123"]
    assert gateway[7:] == public_limit_flags(_server_config(tmp_path))
    # Flower's own host/port is the private loopback socket its executor connects to.
    assert flower[:4] == ["--host", "127.0.0.1", "--port", "9124"]
    assert command[command.index("--database") + 1] == str(tmp_path / "state" / "superlink.db")
    assert command[command.index("--ssl-certfile") + 1] == str(tmp_path / "certs" / "server.pem")
    assert "--enable-supernode-auth" in command
    assert "--disable-runtime-dependency-installation" in command
    assert "--insecure" not in command


def test_the_public_port_limits_reach_the_gateway_in_its_units(tmp_path: Path) -> None:
    import dataclasses

    from fedmed.flower.gateway import _parse, port_limits

    config = dataclasses.replace(
        _server_config(tmp_path),
        public_max_body_mib=64,
        public_max_header_kib=8,
        public_header_timeout_s=2.5,
        public_max_connections_per_peer=4,
        keep_alive_timeout_s=7.0,
    )
    args, _ = _parse(superlink_command(config)[3:])

    limits = port_limits(args)
    assert (limits.max_body_bytes, limits.max_header_bytes) == (64 << 20, 8 << 10)
    assert (limits.header_timeout_s, limits.request_timeout_s) == (2.5, 300.0)
    assert (limits.max_connections, limits.max_connections_per_peer) == (512, 4)
    assert args.keep_alive_timeout == 7.0


def test_insecure_superlink_command_has_no_tls_or_auth(tmp_path: Path) -> None:
    command = superlink_command(_server_config(tmp_path, insecure=True))

    assert "--insecure" in command
    assert "--enable-supernode-auth" not in command
    assert not any(arg.startswith("--ssl") for arg in command)


def test_local_address_is_the_private_port_and_fleet_address_the_public_one(
    tmp_path: Path,
) -> None:
    config = _server_config(tmp_path)
    assert config.local_address == "127.0.0.1:9124"
    assert config.fleet_address == "127.0.0.1:9123"


def test_superlink_picks_a_free_control_port_when_none_is_configured(tmp_path: Path) -> None:
    import dataclasses

    from fedmed.server.superlink import SuperLink

    link = SuperLink(dataclasses.replace(_server_config(tmp_path), control_port=None))
    port = link.config.control_port
    assert port is not None and port not in (0, 9123)
    assert link.address == f"127.0.0.1:{port}"


def test_fab_is_deterministic_and_holds_no_run_config() -> None:
    first = build_fab()
    second = build_fab()
    other = build_fab(server_module="pkg.mod:server", client_module="pkg.mod:client")

    assert first.hash_str == second.hash_str
    assert first.hash_str != other.hash_str
    names = zipfile.ZipFile(io.BytesIO(first.content)).namelist()
    assert sorted(names) == [
        ".info/CONTENT",
        "fedmed_app/__init__.py",
        "fedmed_app/client_app.py",
        "fedmed_app/server_app.py",
        "pyproject.toml",
    ]


def test_fab_pyproject_declares_every_setting_with_its_default() -> None:
    import tomllib

    files = fab_files()
    project = tomllib.loads(files["pyproject.toml"].decode())

    assert project["project"]["name"] == "fedmed-app"
    assert project["tool"]["flwr"]["app"]["publisher"] == "fedmed"
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedmed_app.server_app:app",
        "clientapp": "fedmed_app.client_app:app",
    }
    config = project["tool"]["flwr"]["app"]["config"]
    assert config == default_run_config()
    assert config["num-rounds"] == 3 and config["strategy"] == "fedavg"
    assert files["fedmed_app/server_app.py"].startswith(b"from fedmed.server.app import app\n")
    assert files["fedmed_app/client_app.py"].startswith(b"from fedmed.client.app import app\n")


def test_submit_refuses_an_unknown_run_config_key_before_contacting_the_superlink() -> None:
    with pytest.raises(ConfigError, match=r"\[app\] key\(s\) num-round are not fedmed"):
        submit_run(None, build_fab(), run_config={"num-round": 2})  # type: ignore[arg-type]


def test_fab_shim_can_point_at_another_app_attribute() -> None:
    files = fab_files(server_module="pkg.mod:server", client_module="pkg.mod:client")
    assert files["fedmed_app/server_app.py"].startswith(b"from pkg.mod import server as app\n")
    with pytest.raises(ValueError, match="not a module"):
        fab_files(server_module="os; rm -rf")


def test_shim_modules_compile() -> None:
    modules = {n: c for n, c in fab_files().items() if n.endswith(".py")}
    assert len(modules) == 3
    for name, content in modules.items():
        compile(content, name, "exec")
