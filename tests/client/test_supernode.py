"""The site side: node config, SuperNode command, restart loop, data check before joining."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from fedmed.client.cli import main as client_main
from fedmed.client.supernode import (
    SiteNode,
    installed_app_hash,
    node_env,
    site_pins,
    supernode_command,
    write_node_config,
)

from fedmed.errors import DataError, FederationError, SecurityError
from fedmed.security.encryption import EncryptionKey
from fedmed.site_config import SiteConfig


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _site_config(tmp_path: Path, **changes: object) -> SiteConfig:
    config = SiteConfig(
        path=tmp_path / "A.toml",
        site="A",
        data_dir=tmp_path / "data dir with 'quotes' and \"more\"",
        cache_dir=tmp_path / "cache",
        cache_mode="disk",
        device="cuda:0,cuda:1",
        seed=7,
        server_address="127.0.0.1:9",
        ca_cert=tmp_path / "ca.pem",
        private_key=tmp_path / "siteA.key",
        insecure=False,
        state_dir=tmp_path / "state",
        runtime_port=_free_port(),
        max_restarts=2,
        backoff_initial_s=1.0,
        backoff_max_s=3.0,
        check_data=True,
    )
    return dataclasses.replace(config, **changes)


def test_node_config_file_parses_back_through_flower(tmp_path: Path) -> None:
    with warnings.catch_warnings():  # flwr.common.config imports typer (click deprecation)
        warnings.simplefilter("ignore", DeprecationWarning)
        from flwr.common.config import parse_config_args

    config = _site_config(tmp_path)
    path = write_node_config(config)

    assert parse_config_args([str(path)]) == config.node_config()
    assert parse_config_args([str(path)])["data-dir"].endswith("'quotes' and \"more\"")


def test_supernode_command_uses_tls_site_key_and_own_port(tmp_path: Path) -> None:
    config = _site_config(tmp_path, heartbeat_interval_s=12.0)
    command = supernode_command(config, tmp_path / "nc.toml")

    assert command[:8] == [
        sys.executable, "-m", "fedmed.flower.liveness", "--heartbeat-interval", "12.0",
        "--poll-interval", "0.5", "--"
    ]  # fmt: skip
    assert command[command.index("--superlink") + 1] == "127.0.0.1:9"
    assert command[command.index("--root-certificates") + 1] == str(tmp_path / "ca.pem")
    assert command[command.index("--auth-supernode-private-key") + 1] == str(tmp_path / "siteA.key")
    assert command[command.index("--port") + 1] == str(config.runtime_port)
    assert command[command.index("--node-config") + 1] == str(tmp_path / "nc.toml")
    assert "--insecure" not in command


def test_insecure_supernode_command(tmp_path: Path) -> None:
    config = _site_config(tmp_path, insecure=True, ca_cert=None, private_key=None)
    command = supernode_command(config, tmp_path / "nc.toml")
    assert "--insecure" in command
    assert "--root-certificates" not in command


def test_installed_app_hash_is_the_shim_fedmed_server_submits() -> None:
    import hashlib

    from fedmed.server.submit import build_fab

    digest = installed_app_hash()
    assert digest == build_fab().hash_str == hashlib.sha256(build_fab().content).hexdigest()


def test_site_pins_put_the_installed_app_first_without_duplicates() -> None:
    other = "ab" * 32
    assert site_pins([other, installed_app_hash(), other]) == [installed_app_hash(), other]
    assert site_pins([other], include_installed=False) == [other]


def test_node_env_puts_the_pinned_wrapper_first_on_path(tmp_path: Path) -> None:
    env = node_env(_site_config(tmp_path, warm_start=False))

    first = env["PATH"].split(os.pathsep)[0]
    assert Path(first) == tmp_path / "state" / "bin"
    assert (Path(first) / "flwr-clientapp").is_file()


def test_a_site_whose_pinning_flower_would_bypass_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a Flower whose ClientApp runtime lost the hook the pin check wraps
    import importlib

    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    monkeypatch.delattr(runtime, "install_from_fab")
    (tmp_path / "ca.pem").write_text("x")
    config = _site_config(tmp_path, insecure=True, ca_cert=None, private_key=None)
    node = SiteNode(config)

    # Execute / Assert: refused before any SuperNode process starts
    with pytest.raises(SecurityError, match=r"app pinning cannot be proven .* install_from_fab"):
        node.run()
    assert node.proc is None and node.warm is None


def test_backoff_doubles_up_to_the_maximum(tmp_path: Path) -> None:
    node = SiteNode(_site_config(tmp_path))
    assert [node.backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 3.0]


def test_missing_site_key_is_a_security_error(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(SecurityError, match=r"private-key .*siteA.key does not exist"):
        SiteNode(_site_config(tmp_path)).run()


def test_unreadable_site_key_is_refused_before_starting(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "siteA.key").write_text("not a key")
    node = SiteNode(_site_config(tmp_path))

    with pytest.raises(SecurityError, match=r"siteA.key is not an OpenSSH private key"):
        node.run()
    assert node.proc is None


@pytest.mark.slow
def test_giving_up_after_max_restarts_reports_the_exit(tmp_path: Path) -> None:
    # Prepare: the SuperNode's runtime port is taken, so every start exits at once.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        config = _site_config(
            tmp_path, insecure=True, ca_cert=None, private_key=None, runtime_port=port,
            max_restarts=1,
        )  # fmt: skip
        waits: list[float] = []
        node = SiteNode(config, sleep=waits.append)

        # Execute
        with pytest.raises(FederationError, match=r"exited with code 1 2 times in a row"):
            node.run()

    # Assert
    assert waits == [1.0]
    assert node.restarts == 1
    assert node.proc is not None and node.proc.poll() is not None
    assert "address already in use" in node.log_file.read_text()


@pytest.mark.slow
def test_stop_ends_the_loop_and_the_supernode(tmp_path: Path) -> None:
    # Nothing listens on port 9: the SuperNode keeps retrying until stopped.
    config = _site_config(tmp_path, insecure=True, ca_cert=None, private_key=None)
    node = SiteNode(config)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(node.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while node.proc is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    assert node.proc is not None and node.proc.poll() is None

    node.stop()
    thread.join(timeout=30)

    assert result == [0]
    assert node.proc.poll() is not None


def test_client_refuses_a_bad_data_folder_with_exit_4(tmp_path: Path, capsys) -> None:
    (tmp_path / "A.toml").write_text(
        'site = "A"\ndata-dir = "missing"\n[connection]\nserver-address = "127.0.0.1:9"\n'
        "insecure = true\n"
    )
    code = client_main(["--site", "A", "--config", str(tmp_path / "A.toml")])

    assert code == DataError.exit_code
    assert "data folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "key", "code"),
    [("", False, 3), ("plaintext-cache = true\n", False, 4), ("", True, 4)],
    ids=["no-key", "plaintext-accepted", "key"],
)
def test_client_refuses_a_plaintext_disk_cache_unless_the_site_accepts_it(
    tmp_path: Path, monkeypatch, capsys, extra: str, key: bool, code: int
) -> None:
    # Prepare: a disk cache; the data folder is missing, so a site past the cache check exits 4
    monkeypatch.delenv("FEDMED_CACHE_KEY", raising=False)
    if key:
        monkeypatch.setenv("FEDMED_CACHE_KEY", EncryptionKey.generate().to_text())
    path = tmp_path / "A.toml"
    path.write_text(
        f'site = "A"\ndata-dir = "missing"\ncache-mode = "disk"\n{extra}[connection]\n'
        'server-address = "127.0.0.1:9"\ninsecure = true\n'
    )
    # Execute
    exit_code = client_main(["--site", "A", "--config", str(path)])
    # Assert
    err = capsys.readouterr().err
    assert exit_code == code, err
    if code == 3:
        assert f"site config {path}: cache-mode = 'disk' would write the site's patient" in err
        assert "set FEDMED_CACHE_KEY" in err and "set plaintext-cache = true" in err
        assert not (tmp_path / ".fedmed-site-A").exists()
    else:
        assert "data folder" in err


def test_client_reports_a_missing_config_with_exit_3(tmp_path: Path, capsys) -> None:
    code = client_main(["--site", "Z", "--config", str(tmp_path / "Z.toml")])
    assert code == 3
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_client_process_stops_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "A.toml").write_text(
        'site = "A"\ndata-dir = "d"\ncheck-data = false\nstate-dir = "s"\n[connection]\n'
        f'server-address = "127.0.0.1:9"\ninsecure = true\nruntime-port = {_free_port()}\n'
    )
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "fedmed-client"), "--site", "A", "--config",
         str(tmp_path / "A.toml")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        log_file = tmp_path / "s" / "logs" / "supernode.log"
        deadline = time.monotonic() + 30
        while not log_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 130, err
    assert "SuperNode pid" in err.decode()
    assert b"WARNING: insecure" in err
