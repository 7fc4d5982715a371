"""``fedmed-server``: the central side (Flower SuperLink + the fedmed server app).

Starts a SuperLink (TLS and site authentication on unless ``--insecure``) whose public
``host:port`` serves only Flower's Fleet API to the sites, while run submission and key
registration stay on a private 127.0.0.1 control port (:mod:`fedmed.flower.gateway`); registers
the allow-listed site keys over the private port, waits for ``min-sites`` sites (bounded),
submits the fedmed app (a shim FAB, the same for every run) with the ``[app]`` table as Flower's
override run config (plus ``signing-dir`` = the server's certs folder unless ``[app]`` sets it:
sites with TLS refuse unsigned models), streams the run's logs and exits 0 when the run
completed. Ctrl-C or SIGTERM stops the run and every process this command started.

Example::

    fedmed certs certs --server-address 127.0.0.1     # CA key into certs-ca/, not certs/
    fedmed certs certs --add-site A --public-key siteA.pub   # from `fedmed site-key` at A
    fedmed-server --config configs/federation.toml

It warns at start when it finds the CA's private key (``ca.key``) in its certs folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from fedmed.cli.runner import add_version, configure_logging, run_command
from fedmed.config import FederationConfig, load_federation_config
from fedmed.errors import ConfigError, FederationError
from fedmed.flower.version import check_flower_version

__all__ = ["main", "run_server"]

log = logging.getLogger("fedmed.server")
DEFAULT_CONFIG = Path("configs/federation.toml")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _with_insecure(config: FederationConfig) -> FederationConfig:
    server = dataclasses.replace(
        config.server, insecure=True, ca_cert=None, server_cert=None, server_key=None
    )
    return dataclasses.replace(config, server=server)


def _check_run_config(config: FederationConfig) -> None:
    """Refuse a bad ``[app]`` table now, before any process starts (fedmed's app only)."""
    if config.server.server_app != "fedmed.server.app":
        return
    from fedmed.runsettings.settings import RunSettings

    try:
        RunSettings.from_run_config(config.app)
    except ConfigError as err:
        raise ConfigError(f"{config.path}: [app] {err}") from err


def _with_default_signing(config: FederationConfig) -> FederationConfig:
    """Sign global models with the server's TLS key unless ``[app]`` says otherwise.

    With TLS, sites refuse unsigned models by default (``require-signed-models``), so fedmed's
    app gets ``signing-dir`` = the folder of ``server.key``/``server.pem`` when ``[app]`` has
    no ``signing-dir`` key (``signing-dir = ""`` turns signing off).

    Raises:
        ConfigError: TLS is on, ``[app]`` has no ``signing-dir`` and the server's key and
            certificate are not a folder's ``server.key`` + ``server.pem`` (what a signer reads).
    """
    server = config.server
    if (
        server.server_app != "fedmed.server.app"
        or server.insecure
        or "signing-dir" in config.app
        or server.server_key is None
        or server.server_cert is None
    ):
        return config
    folder = server.server_key.parent
    if (server.server_key.name, server.server_cert) != ("server.key", folder / "server.pem"):
        raise ConfigError(
            f"{config.path}: [server] server-key/server-cert ({server.server_key}, "
            f"{server.server_cert}) are not one folder's server.key + server.pem, so global "
            "models cannot be signed by default and sites with TLS would refuse them: set [app] "
            'signing-dir to a folder holding server.key + server.pem, or signing-dir = "" (and '
            "require-signed-models = false in the sites' configs)"
        )
    return dataclasses.replace(config, app={**config.app, "signing-dir": str(folder)})


def _ca_keys_in_certs(config: FederationConfig) -> list[Path]:
    """``ca.key`` files in the folders the server reads its certificates from."""
    server = config.server
    files = (server.ca_cert, server.server_cert, server.server_key)
    folders = {path.parent for path in files if path is not None}
    return sorted(f / "ca.key" for f in folders if os.path.lexists(f / "ca.key"))


def _write_log(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


_FOREIGN_APP_TIMEOUT_S = 24 * 3600.0  # a server app other than fedmed's: its settings unknown


def run_timeout(config: FederationConfig) -> float:
    """``[server] run-timeout`` when set, else the bound the run's own settings imply
    (:attr:`~fedmed.runsettings.settings.RunSettings.run_deadline`), so a study of many long rounds
    is not stopped at an arbitrary hour."""
    if config.server.run_timeout_s is not None:
        return config.server.run_timeout_s
    if config.server.server_app != "fedmed.server.app":
        return _FOREIGN_APP_TIMEOUT_S
    from fedmed.runsettings.settings import RunSettings

    return RunSettings.from_run_config(dict(config.app)).run_deadline


def run_server(config: FederationConfig) -> int:
    """Run the central side for ``config`` until the run ends; return the exit code.

    Raises:
        FederationError: the SuperLink failed, too few sites joined, or the run failed.
    """
    server = config.server
    # The Control API client reads Flower's credential store under FLWR_HOME at import time.
    os.environ["FLWR_HOME"] = str(server.state_dir / "flwr-cli-home")
    from fedmed.server.submit import (
        build_fab,
        register_sites,
        stop_run,
        stop_unfinished_runs,
        submit_run,
        wait_for_run,
        wait_for_sites,
    )
    from fedmed.server.superlink import SuperLink

    from fedmed.flower.control import control_client

    timeout = run_timeout(config)
    log.info("run timeout %.0f s (%.1f h)", timeout, timeout / 3600)
    run_id: int | None = None
    with SuperLink(server) as link, control_client(link.address, ca_cert=server.ca_cert) as client:
        try:
            if not server.insecure:
                register_sites(client, server.sites)
            stop_unfinished_runs(client)
            online = wait_for_sites(
                client,
                min_sites=server.min_sites,
                timeout=server.wait_for_sites_s,
                alive=link.alive,
            )
            fab = build_fab(server_module=server.server_app, client_module=server.client_app)
            run_id = submit_run(client, fab, run_config=config.app)
            outcome = wait_for_run(
                client,
                run_id,
                timeout=timeout,
                log_sink=_write_log if server.stream_logs else None,
                alive=link.alive,
            )
        except KeyboardInterrupt:
            if run_id is not None:
                stop_run(client, run_id)
            raise
    summary = (
        f"run {outcome.run_id} {outcome.status} in {outcome.seconds:.0f} s with sites "
        f"{', '.join(sorted(online))}; state {server.state_dir}"
    )
    out_dir = config.app.get("out-dir")
    if out_dir:
        summary += f"; outputs {out_dir}"
    if not outcome.ok:
        raise FederationError(
            f"{summary}. {outcome.details or 'see the log above'}; the SuperLink log is "
            f"{link.log_file}"
        )
    print(f"fedmed-server: {summary}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run the central side."""
    parser = argparse.ArgumentParser(
        prog="fedmed-server",
        description="the central side: a Flower SuperLink plus the fedmed server app",
    )
    add_version(parser)
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="federation config (TOML)"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no site authentication (local tests only; anyone can join)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)

    def run() -> int:
        check_flower_version()
        config = load_federation_config(args.config)
        for ca_key in _ca_keys_in_certs(config):
            print(
                f"fedmed-server: WARNING: {ca_key}: the federation CA's private key is in the "
                "server's certs folder, so whoever reads the server's files can issue "
                "certificates every site trusts: move it to an offline place (`fedmed certs` "
                "writes it to CERTS-ca/) and keep only ca.pem, server.pem and server.key here",
                file=sys.stderr,
            )
        _check_run_config(config)
        if args.insecure:
            config = _with_insecure(config)
        config = _with_default_signing(config)
        if not config.server.insecure and config.app.get("signing-dir") == "":
            print(
                'fedmed-server: WARNING: [app] signing-dir = "": global models are not signed '
                "and sites with TLS refuse them unless their config sets "
                "require-signed-models = false",
                file=sys.stderr,
            )
        if config.server.insecure:
            print(
                "fedmed-server: WARNING: --insecure: no TLS, no site authentication. Model "
                "weights travel in clear and anyone who reaches the port can join or submit "
                "code. Never use this outside a local test.",
                file=sys.stderr,
            )
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return run_server(config)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return run_command(run, prog="fedmed-server")
