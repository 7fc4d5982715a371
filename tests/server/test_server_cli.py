"""fedmed-server: a bad [app] run config is refused before any process starts; models are
signed by default with TLS."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from fedmed.server.cli import _with_default_signing, _with_insecure, main, run_timeout

from fedmed.config import load_federation_config
from fedmed.errors import ConfigError
from fedmed.runsettings.settings import RunSettings
from fedmed.security.pki import write_pki


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("certs")
    write_pki(root, server_hosts=["127.0.0.1"], sites=["A", "B"])
    return root


def _federation(tmp_path: Path, certs: Path, app: str) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = 9092\nstate-dir = "{tmp_path / "state"}"\n'
        f'certs-dir = "{certs}"\nmin-sites = 2\n'
        f'[server.sites]\nA = "{certs / "siteA.pub"}"\nB = "{certs / "siteB.pub"}"\n'
        f"[app]\n{app}"
    )
    return path


@pytest.mark.parametrize(
    ("app", "match"),
    [
        ("secure-aggregation = true\n", r"\[app\] run config key 'secure-aggregation' is true"),
        ('strategy = "krum"\n', r"\[app\] run config key 'strategy' is 'krum'"),
    ],
    ids=["secagg-two-sites", "unknown-strategy"],
)
def test_bad_run_config_exits_3_naming_file_and_key(
    tmp_path: Path, certs: Path, capsys: pytest.CaptureFixture[str], app: str, match: str
) -> None:
    config = _federation(tmp_path, certs, app)

    code = main(["--config", str(config)])

    assert code == 3
    err = capsys.readouterr().err
    assert str(config) in err
    assert re.search(match, err), err
    assert not (tmp_path / "state").exists(), "nothing may start for a bad config"


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        ("num-rounds = 1\n", "certs"),  # TLS: sign with the server's key (sites require it)
        ('signing-dir = ""\n', ""),  # explicitly off
        ('signing-dir = "/keys"\n', "/keys"),  # the operator's choice stands
    ],
    ids=["default", "off", "own"],
)
def test_models_are_signed_by_default_with_tls(
    tmp_path: Path, certs: Path, app: str, expected: str
) -> None:
    config = load_federation_config(_federation(tmp_path, certs, app))

    signed = _with_default_signing(config).app.get("signing-dir")

    assert signed == (str(certs) if expected == "certs" else expected)
    insecure = _with_insecure(config)  # no TLS: sites cannot verify, nothing is added
    assert _with_default_signing(insecure).app == insecure.app


def test_explicit_server_key_files_need_an_explicit_signing_dir(
    tmp_path: Path, certs: Path
) -> None:
    # the key and certificate under other names: the default signer could not read them
    own = tmp_path / "tls"
    own.mkdir()
    (own / "link.key").write_bytes((certs / "server.key").read_bytes())
    (own / "link.pem").write_bytes((certs / "server.pem").read_bytes())
    path = _federation(tmp_path, certs, "num-rounds = 1\n")
    text = path.read_text().replace(
        f'certs-dir = "{certs}"\n',
        f'certs-dir = "{certs}"\nserver-key = "{own / "link.key"}"\n'
        f'server-cert = "{own / "link.pem"}"\n',
    )
    path.write_text(text)
    config = load_federation_config(path)

    with pytest.raises(
        ConfigError, match=r"not one folder's server.key \+ server.pem.*signing-dir"
    ):
        _with_default_signing(config)
    explicit = load_federation_config(path).app | {"signing-dir": ""}
    assert _with_default_signing(dataclasses.replace(config, app=explicit)).app == explicit


def test_a_ca_key_in_the_certs_folder_is_warned_about_at_start(
    tmp_path: Path, certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a coordinator that copied the CA's key next to server.key
    own = tmp_path / "certs"
    own.mkdir()
    for name in ("ca.pem", "server.pem", "server.key", "siteA.pub", "siteB.pub"):
        (own / name).write_bytes((certs / name).read_bytes())
    config = _federation(tmp_path, own, 'strategy = "krum"\n')  # refused before any process

    assert main(["--config", str(config)]) == 3
    assert "ca.key" not in capsys.readouterr().err
    (own / "ca.key").write_bytes(
        certs.with_name(f"{certs.name}-ca").joinpath("ca.key").read_bytes()
    )

    # Execute
    code = main(["--config", str(config)])

    # Assert
    assert code == 3
    err = capsys.readouterr().err
    assert f"WARNING: {own / 'ca.key'}: the federation CA's private key is in the server's" in err
    assert "move it to an offline place" in err


def test_the_run_timeout_follows_the_run_settings_unless_set(tmp_path: Path, certs: Path) -> None:
    # a multi-day study: 200 rounds of up to 30 minutes, no [server] run-timeout
    app = "num-rounds = 200\nround-timeout = 1800.0\njoin-timeout = 600.0\nmin-sites = 2\n"
    config = load_federation_config(_federation(tmp_path, certs, app))
    derived = run_timeout(config)
    assert derived == RunSettings.from_run_config(dict(config.app)).run_deadline
    assert derived > 200 * 3 * 1800  # every round may use all its attempts
    # set explicitly, it wins; a foreign server app (unknown settings) gets a day
    server = dataclasses.replace(config.server, run_timeout_s=7200.0)
    assert run_timeout(dataclasses.replace(config, server=server)) == 7200.0
    server = dataclasses.replace(config.server, server_app="my_lab.app:server")
    assert run_timeout(dataclasses.replace(config, server=server)) == 24 * 3600.0
