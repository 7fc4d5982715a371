"""Config files: the shipped examples load as-is; every mistake names the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmed.config import load_federation_config
from fedmed.errors import ConfigError
from fedmed.site_config import load_site_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

FEDERATION = """
[server]
port = 9100
state-dir = "state"
certs-dir = "certs"
min-sites = 2
[server.sites]
A = "certs/siteA.pub"
B = "certs/siteB.pub"
[app]
num-rounds = 2
data-dir = "holdout"
"""

SITE = """
site = "A"
data-dir = "data"
[connection]
server-address = "127.0.0.1:9100"
ca-cert = "certs/ca.pem"
private-key = "certs/siteA.key"
"""


def _write(tmp_path: Path, text: str, name: str = "conf.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_federation_config_loads_and_resolves_paths() -> None:
    config = load_federation_config(CONFIGS / "federation.toml")

    assert config.server.insecure is False
    assert config.server.ca_cert == (CONFIGS.parent / "certs" / "ca.pem").resolve()
    assert set(config.server.sites) == {"A", "B"}
    assert config.app["num-rounds"] == 2
    assert config.app["min-sites"] == config.server.min_sites
    assert config.app["data-dir"] == str((CONFIGS.parent / "demo/data/holdout").resolve())
    assert (config.server.port, config.server.control_port) == (9092, 9093)
    assert config.server.local_address == "127.0.0.1:9093"


@pytest.mark.parametrize("site", ["A", "B"])
def test_shipped_site_configs_load_with_distinct_ports(site: str) -> None:
    config = load_site_config(CONFIGS / "sites" / f"{site}.toml", site=site)

    assert config.site == site
    assert config.data_dir == (CONFIGS.parent / f"demo/data/site-{site}").resolve()
    assert config.private_key == (CONFIGS.parent / f"certs/site{site}.key").resolve()
    assert config.node_config()["site"] == site
    other = load_site_config(CONFIGS / "sites" / ("B.toml" if site == "A" else "A.toml"))
    assert other.runtime_port != config.runtime_port


def test_shipped_app_table_is_accepted_by_the_server_app_settings() -> None:
    settings = pytest.importorskip("fedmed.runsettings.settings")
    config = load_federation_config(CONFIGS / "federation.toml")

    run = settings.RunSettings.from_run_config(config.app)

    assert run.num_rounds == config.app["num-rounds"]


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    config = load_federation_config(_write(tmp_path, FEDERATION))

    assert config.server.state_dir == tmp_path / "state"
    assert config.server.server_key == tmp_path / "certs" / "server.key"
    assert config.app["data-dir"] == str(tmp_path / "holdout")
    assert config.server.fleet_address == "127.0.0.1:9100"
    assert config.server.control_port is None  # a free loopback port is chosen at start


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ("port = 9100", "port = 70000", r"\[server\] port = 70000 must be a port in 1..65535"),
        ("port = 9100", 'port = "9100"', r"\[server\] port = '9100' must be int"),
        ("port = 9100", "port = true", r"\[server\] port = True must be int"),
        ("min-sites = 2", "min-sites = 3", "min-sites = 3 but only 2 site"),
        ("min-sites = 2", "min-sites = 0", r"min-sites = 0 must be > 0"),
        ('state-dir = "state"', "", r"\[server\] state-dir is missing"),
        ('certs-dir = "certs"', "", "certs-dir is missing and TLS is on"),
        ("port = 9100", "prot = 9100", r"unknown key\(s\) prot"),
        ("num-rounds = 2", "num-rounds = [2]", r"\[app\] num-rounds = \[2\] must be a string"),
        ('A = "certs/siteA.pub"', "A = 1", r"\[server.sites\] A = 1 must be the path"),
        ("[app]", "[application]", r"unknown table\(s\) application"),
        ("num-rounds = 2", "num-rounds = 2\nmin-sites = 1", "differs from"),
        ("[server]", "[server", "is not valid TOML"),
        ("port = 9100", "port = 9100\ncontrol-port = 9100", "control-port = 9100 equals port"),
        ("port = 9100", "port = 9100\ncontrol-port = 0", r"control-port = 0 must be a port"),
        ("port = 9100", "port = 9100\npublic-max-body-mib = 0", r"public-max-body-mib = 0 must"),
        ("port = 9100", "port = 9100\npublic-max-connections = 1.5", r"= 1.5 must be int"),
        (
            "port = 9100",
            "port = 9100\npublic-header-timeout = -1",
            r"public-header-timeout = -1.0 must be > 0",
        ),
    ],
    ids=[
        "port-range",
        "port-type",
        "port-bool",
        "min-sites-above-allowed",
        "min-sites-zero",
        "no-state-dir",
        "no-certs",
        "typo",
        "app-list",
        "site-key-type",
        "unknown-table",
        "min-sites-twice",
        "bad-toml",
        "control-port-same",
        "control-port-range",
        "body-limit-zero",
        "connections-float",
        "header-timeout-negative",
    ],
)
def test_federation_config_errors_name_file_and_key(tmp_path, old, new, match) -> None:
    path = _write(tmp_path, FEDERATION.replace(old, new))
    with pytest.raises(ConfigError, match=match) as info:
        load_federation_config(path)
    assert str(path) in str(info.value)


def test_public_port_limits_have_defaults_and_can_be_set(tmp_path: Path) -> None:
    from fedmed.flower.port_limits import PortLimits

    default = load_federation_config(_write(tmp_path, FEDERATION)).server
    shipped = load_federation_config(CONFIGS / "federation.toml").server
    keys = "\n".join(
        [
            "public-max-body-mib = 64",
            "public-max-header-kib = 8",
            "public-header-timeout = 5",
            "public-request-timeout = 60.5",
            "public-max-connections = 100",
            "public-max-connections-per-peer = 10",
            "keep-alive-timeout = 2",
        ]
    )
    chosen = load_federation_config(
        _write(tmp_path, FEDERATION.replace("port = 9100", f"port = 9100\n{keys}"), "set.toml")
    ).server

    def limits(server):
        return (
            server.public_max_body_mib << 20,
            server.public_max_header_kib << 10,
            server.public_header_timeout_s,
            server.public_request_timeout_s,
            server.public_max_connections,
            server.public_max_connections_per_peer,
            server.keep_alive_timeout_s,
        )

    # the config's defaults are the gateway's (PortLimits), and the shipped file states them
    assert limits(default) == (*vars(PortLimits()).values(), 5.0) == limits(shipped)
    assert limits(chosen) == (64 << 20, 8 << 10, 5.0, 60.5, 100, 10, 2.0)


def test_insecure_server_needs_no_certificates(tmp_path: Path) -> None:
    text = '[server]\nstate-dir = "s"\ninsecure = true\nmin-sites = 1\n'
    config = load_federation_config(_write(tmp_path, text))
    assert config.server.insecure is True
    assert config.server.ca_cert is None
    assert config.app == {"min-sites": 1}


def test_missing_config_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist: pass --config"):
        load_federation_config(tmp_path / "nope.toml")


def test_site_config_node_config_and_defaults(tmp_path: Path) -> None:
    config = load_site_config(_write(tmp_path, SITE), site="A")

    assert config.node_config() == {
        "site": "A",
        "data-dir": str(tmp_path / "data"),
        "cache-dir": str(tmp_path / ".fedmed-site-A" / "cache"),
        "cache-mode": "memory",
        "plaintext-cache": False,
        "device": "cpu",
        "seed": 0,
        "on-bad-case": "skip",
        "max-image-gib": 2.0,
        "label-affine-tolerance": 0.001,
        "allow-external-links": False,
        "disclosure-floor": 5,
        "share-models": False,
        "max-epsilon": 0.0,
        "amp": "auto",
        "channels-last": False,
        "compile": False,
        "lamp-micro-batches": 4,
        "lamp-checkpointing": True,
        "lamp-balance": "memory",
        "server-ca": str(tmp_path / "certs" / "ca.pem"),  # refuse unsigned global models
    }
    assert config.runtime_port == 9094
    assert config.max_restarts == 20
    assert config.app_hashes == ()


def test_site_may_accept_unsigned_models_and_insecure_sites_cannot_verify(tmp_path: Path) -> None:
    text = SITE.replace('data-dir = "data"', 'data-dir = "data"\nrequire-signed-models = false')
    assert load_site_config(_write(tmp_path, text)).node_config()["server-ca"] == ""
    text = SITE.replace("[connection]", "[connection]\ninsecure = true")
    assert "server-ca" not in load_site_config(_write(tmp_path, text)).node_config()


def test_site_config_reads_app_hashes(tmp_path: Path) -> None:
    digest = "ab" * 32
    text = SITE.replace('data-dir = "data"', f'data-dir = "data"\napp-hash = ["{digest}"]')
    assert load_site_config(_write(tmp_path, text), site="A").app_hashes == (digest,)


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ('site = "A"', 'site = "B"', "site = 'B' but --site A was given"),
        ('site = "A"', 'site = "A B"', "site = 'A B' is invalid"),
        ('"127.0.0.1:9100"', '"127.0.0.1"', r"server-address = '127.0.0.1' must be HOST:PORT"),
        ('private-key = "certs/siteA.key"', "", "needs ca-cert and private-key"),
        (
            'data-dir = "data"',
            'data-dir = "data"\ncache-mode = "ram"',
            "cache-mode = 'ram' must be one of memory, disk, none",
        ),
        ('data-dir = "data"', 'data-dir = "data"\ndevice = "cuda:0,"', "device = 'cuda:0,'"),
        ('data-dir = "data"', "", "data-dir is missing"),
        ("[connection]", "[connection]\nbackoff-max = 0.5", "backoff-max = 0.5 is below"),
        ("[connection]", "[connection]\nmax-restarts = -1", "max-restarts = -1 must be >= 0"),
        ("[connection]", "[connection]\nport = 1", r"\[connection\] has unknown key\(s\) port"),
        ('data-dir = "data"', 'data-dir = "data"\napp-hash = ["abc"]', "app-hash entry 'abc'"),
        ('data-dir = "data"', 'data-dir = "data"\napp-hash = "x"', "app-hash = 'x' must be list"),
        (
            'data-dir = "data"',
            'data-dir = "data"\non-bad-case = "ignore"',
            "on-bad-case = 'ignore'",
        ),
        ('data-dir = "data"', 'data-dir = "data"\nmax-image-gib = 0', "max-image-gib = 0.0 must"),
        ('data-dir = "data"', 'data-dir = "data"\nmax-image-gib = nan', "must be a finite number"),
        (
            'data-dir = "data"',
            'data-dir = "data"\nlabel-affine-tolerance = -1',
            "label-affine-tolerance = -1.0 must be >= 0",
        ),
        (
            'data-dir = "data"',
            'data-dir = "data"\nallow-external-links = "yes"',
            "allow-external-links = 'yes' must be bool",
        ),
        ('data-dir = "data"', 'data-dir = "data"\namp = "fp8"', "amp = 'fp8' must be one of"),
        (
            'data-dir = "data"',
            'data-dir = "data"\nlamp-micro-batches = 0',
            "lamp-micro-batches = 0 must be > 0",
        ),
        (
            'data-dir = "data"',
            'data-dir = "data"\nlamp-balance = "speed"',
            "lamp-balance = 'speed' must be one of",
        ),
        ('data-dir = "data"', 'data-dir = "data"\ncompile = 1', "compile = 1 must be bool"),
        (
            'data-dir = "data"',
            'data-dir = "data"\ncache-mode = "disk-encrypted"',
            r"\[site\] cache-mode = 'disk-encrypted' is a retired spelling: write 'disk' "
            r"\(encrypted with FEDMED_CACHE_KEY, which a disk cache needs unless plaintext-cache",
        ),
        (
            'data-dir = "data"',
            'data-dir = "data"\nplaintext-cache = "yes"',
            "plaintext-cache = 'yes' must be bool",
        ),
        ('data-dir = "data"', 'data-dir = "data"\ndevice = ["cpu", 0]', "must list device"),
    ],
    ids=[
        "other-site",
        "bad-name",
        "no-port",
        "no-key",
        "cache-mode",
        "device",
        "no-data",
        "backoff",
        "restarts",
        "typo",
        "app-hash-short",
        "app-hash-type",
        "on-bad-case",
        "max-image-gib",
        "max-image-gib-nan",
        "tolerance",
        "links",
        "amp",
        "lamp-micro-batches",
        "lamp-balance",
        "compile",
        "cache-mode-retired",
        "plaintext-cache",
        "device-list",
    ],
)
def test_site_config_errors_name_file_and_key(tmp_path, old, new, match) -> None:
    path = _write(tmp_path, SITE.replace(old, new))
    with pytest.raises(ConfigError, match=match) as info:
        load_site_config(path, site="A")
    assert str(path) in str(info.value)


def test_site_config_sets_the_case_guard_and_its_node_config_reads_back(tmp_path: Path) -> None:
    from fedmed.io.guard import GuardSettings

    text = SITE.replace(
        'data-dir = "data"',
        'data-dir = "data"\non-bad-case = "stop"\nmax-image-gib = 4\n'
        "label-affine-tolerance = 0.5\nallow-external-links = true",
    )
    config = load_site_config(_write(tmp_path, text), site="A")
    default = load_site_config(_write(tmp_path, SITE, "default.toml"), site="A")

    assert GuardSettings.from_node_config(config.node_config()) == GuardSettings(
        max_image_bytes=4 * 2**30,
        label_affine_tolerance=0.5,
        on_bad_case="stop",
        allow_external_links=True,
    )
    assert GuardSettings.from_node_config(default.node_config()) == GuardSettings()


def test_site_hardware_keys_reach_the_hardware_settings(tmp_path: Path) -> None:
    from fedmed.devices import BALANCES
    from fedmed.hardware import AMP_MODES, HardwareSettings
    from fedmed.site_config import AMP_MODES as CONFIG_AMP_MODES
    from fedmed.site_config import LAMP_BALANCES

    text = SITE.replace(
        'data-dir = "data"',
        'data-dir = "data"\ndevice = ["cpu", "cpu"]\namp = "bf16"\nchannels-last = true\n'
        'lamp-micro-batches = 2\nlamp-checkpointing = false\nlamp-balance = "time"',
    )
    config = load_site_config(_write(tmp_path, text), site="A")
    default = load_site_config(_write(tmp_path, SITE, "default.toml"), site="A")

    assert config.device == "cpu,cpu"
    assert HardwareSettings.from_node_config(config.node_config()) == HardwareSettings(
        devices="cpu,cpu",
        amp="bf16",
        channels_last=True,
        lamp_micro_batches=2,
        lamp_checkpointing=False,
        lamp_balance="time",
    )
    # the config's defaults are HardwareSettings' (reading a config never imports torch)
    hardware = HardwareSettings.from_node_config(default.node_config())
    assert hardware == HardwareSettings(devices="cpu")
    assert set(CONFIG_AMP_MODES) == set(AMP_MODES) and set(LAMP_BALANCES) == set(BALANCES)


def test_fedmed_client_refuses_a_device_this_machine_lacks(tmp_path: Path) -> None:
    import torch
    from fedmed.client.cli import check_hardware

    missing = f"cuda:{torch.cuda.device_count()}"
    text = SITE.replace('data-dir = "data"', f'data-dir = "data"\ndevice = "cpu,{missing}"')
    path = _write(tmp_path, text)
    config = load_site_config(path, site="A")
    with pytest.raises(ConfigError, match=f"site config {path}: device = 'cpu,{missing}'"):
        check_hardware(config)
