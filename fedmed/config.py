"""The deployment config files, read and validated once into frozen dataclasses.

``configs/federation.toml`` (central side) has a ``[server]`` table (:class:`ServerConfig`) and
an ``[app]`` table that becomes Flower's run config verbatim (the server app documents its keys;
values must be strings, integers, floats or booleans); a site's ``configs/sites/A.toml`` is
read by :mod:`fedmed.site_config`. Keys use dashes, as Flower's run config does. Relative paths
are resolved against the folder of the config file, so a config works from any working
directory; in
``[app]`` the values of keys ending in ``-dir``, ``-file`` or ``-path`` are paths too.

Every error is a :class:`~fedmed.errors.ConfigError` naming the file, the key and the fix.

Example:
    >>> server = load_federation_config(Path("configs/federation.toml"))
    >>> server.server.port, server.server.control_port, server.app["num-rounds"]
    (9092, 9093, 2)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmed.errors import ConfigError
from fedmed.tomlfile import TomlTable, read_toml

__all__ = [
    "FederationConfig",
    "ServerConfig",
    "load_federation_config",
]

_PATH_SUFFIXES = ("-dir", "-file", "-path")


@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` table of ``federation.toml``: where and how the SuperLink runs.

    Example TOML::

        [server]
        host = "0.0.0.0"          # public address sites connect to
        port = 9092               # public port: Flower's Fleet API and /health only, over TLS
        control-port = 9093       # 127.0.0.1 only: run submission, key registration, Runtime API
        state-dir = "../runs/server"
        certs-dir = "../certs"    # ca.pem, server.pem, server.key from `fedmed certs`
        min-sites = 2
        [server.sites]            # allow-list: site name -> its public key
        A = "../certs/siteA.pub"

    Limits on the public port (:class:`fedmed.flower.port_limits.PortLimits` gives the
    reasons for the defaults), each optional:

    * ``public-max-body-mib`` (256): largest request body a site may send; larger: 413
      before a byte of it is read. Flower sends arrays in 5 MiB objects; SecAgg+ sends a
      site's masked update as one object of 2.0x the model's size.
    * ``public-max-header-kib`` (16): request line plus headers; larger: 431.
    * ``public-header-timeout`` (10 s) and ``public-request-timeout`` (300 s): a request's
      headers, and the whole request, must arrive within these from its first byte (a new
      connection: from the end of its TLS handshake); else 408 and the connection closes.
    * ``public-max-connections`` (512), ``public-max-connections-per-peer`` (32): open
      connections in all and per client address; more: 503 (Flower's sites retry).
    * ``keep-alive-timeout`` (5 s, both sockets): an idle connection is closed after this.
    """

    host: str
    port: int
    state_dir: Path
    ca_cert: Path | None
    server_cert: Path | None
    server_key: Path | None
    insecure: bool
    min_sites: int
    sites: dict[str, Path]
    wait_for_sites_s: float
    run_timeout_s: float | None  # None: derived from the run settings (RunSettings.run_deadline)
    startup_timeout_s: float
    stream_logs: bool
    server_app: str = "fedmed.server.app"
    client_app: str = "fedmed.client.app"
    control_port: int | None = None
    public_max_body_mib: int = 256
    public_max_header_kib: int = 16
    public_header_timeout_s: float = 10.0
    public_request_timeout_s: float = 300.0
    public_max_connections: int = 512
    public_max_connections_per_peer: int = 32
    keep_alive_timeout_s: float = 5.0

    @property
    def local_address(self) -> str:
        """``127.0.0.1:control-port``: the private socket (Control and Runtime API).

        Raises ValueError while ``control_port`` is None (chosen when the SuperLink starts).
        """
        if self.control_port is None:
            raise ValueError("control_port is chosen when the SuperLink starts")
        return f"127.0.0.1:{self.control_port}"

    @property
    def fleet_address(self) -> str:
        """``host:port`` of the public socket (Fleet API) as seen from this machine."""
        host = self.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


@dataclass(frozen=True)
class FederationConfig:
    """``federation.toml``: the ``[server]`` table and the ``[app]`` run config."""

    path: Path
    server: ServerConfig
    app: dict[str, str | int | float | bool] = field(default_factory=dict)


def _parse_app(path: Path, data: Any) -> dict[str, str | int | float | bool]:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: [app] must be a table of run-config values")
    app: dict[str, str | int | float | bool] = {}
    for key, value in data.items():
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(
                f"{path}: [app] {key} = {value!r} must be a string, number or boolean "
                "(Flower's run config holds scalars only)"
            )
        if isinstance(value, str) and key.endswith(_PATH_SUFFIXES) and value:
            value = str((path.parent / Path(value).expanduser()).resolve())
        app[key] = value
    return app


def load_federation_config(path: Path) -> FederationConfig:
    """Read and validate ``federation.toml``.

    Raises:
        ConfigError: the file is missing, invalid, or a key is missing or wrong.
    """
    path = Path(path).expanduser().resolve()
    data = read_toml(path)
    unknown = sorted(set(data) - {"server", "app"})
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(unknown)}: use [server] and [app]")
    table = TomlTable(path, "server", data.get("server", {}))
    insecure = table.get("insecure", bool, False)
    certs_dir = table.path_value("certs-dir", None)

    def cert(key: str, name: str) -> Path | None:
        explicit = table.path_value(key, None)
        if explicit is not None:
            return explicit
        return certs_dir / name if certs_dir is not None else None

    ca_cert, server_cert, server_key = (
        cert("ca-cert", "ca.pem"),
        cert("server-cert", "server.pem"),
        cert("server-key", "server.key"),
    )
    if not insecure and None in (ca_cert, server_cert, server_key):
        raise ConfigError(
            f"{path}: [server] certs-dir is missing and TLS is on: set certs-dir to the folder "
            "written by `fedmed certs` (or ca-cert/server-cert/server-key), or run with "
            "--insecure for a local test"
        )
    raw_sites = table.get("sites", dict, {})
    sites: dict[str, Path] = {}
    for name, key_path in raw_sites.items():
        if not isinstance(key_path, str) or not key_path:
            raise ConfigError(
                f"{path}: [server.sites] {name} = {key_path!r} must be the path of the site's "
                "public key (siteX.pub from `fedmed certs`)"
            )
        sites[name] = (path.parent / Path(key_path).expanduser()).resolve()
    if not insecure and not sites:
        raise ConfigError(
            f"{path}: [server.sites] is empty: with site authentication on, list each "
            'allowed site and its public key, e.g. A = "../certs/siteA.pub"'
        )
    min_sites = table.positive("min-sites", int, 2)
    if sites and min_sites > len(sites):
        raise ConfigError(
            f"{path}: [server] min-sites = {min_sites} but only {len(sites)} site(s) are "
            "allowed in [server.sites]: lower min-sites or add sites"
        )
    server = ServerConfig(
        host=table.get("host", str, "127.0.0.1"),
        port=table.port("port", 9092),
        state_dir=table.path_value("state-dir"),  # type: ignore[arg-type]
        ca_cert=None if insecure else ca_cert,
        server_cert=None if insecure else server_cert,
        server_key=None if insecure else server_key,
        insecure=insecure,
        min_sites=min_sites,
        sites=sites,
        wait_for_sites_s=table.positive("wait-for-sites", float, 300.0),
        run_timeout_s=table.positive("run-timeout", float, None),
        startup_timeout_s=table.positive("startup-timeout", float, 60.0),
        stream_logs=table.get("stream-logs", bool, True),
        server_app=table.get("server-app", str, "fedmed.server.app"),
        client_app=table.get("client-app", str, "fedmed.client.app"),
        control_port=table.port("control-port", None),
        public_max_body_mib=table.positive("public-max-body-mib", int, 256),
        public_max_header_kib=table.positive("public-max-header-kib", int, 16),
        public_header_timeout_s=table.positive("public-header-timeout", float, 10.0),
        public_request_timeout_s=table.positive("public-request-timeout", float, 300.0),
        public_max_connections=table.positive("public-max-connections", int, 512),
        public_max_connections_per_peer=table.positive("public-max-connections-per-peer", int, 32),
        keep_alive_timeout_s=table.positive("keep-alive-timeout", float, 5.0),
    )
    if server.control_port == server.port:
        raise ConfigError(
            f"{path}: [server] control-port = {server.control_port} equals port: the private "
            "control port must differ from the public port sites connect to"
        )
    table.finish()
    app = _parse_app(path, data.get("app", {}))
    if app.get("min-sites", min_sites) != min_sites:
        raise ConfigError(
            f"{path}: [app] min-sites = {app['min-sites']!r} differs from [server] min-sites = "
            f"{min_sites}: set it once, in [server]"
        )
    app.setdefault("min-sites", min_sites)
    return FederationConfig(path=path, server=server, app=app)
