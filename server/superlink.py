"""The central side's SuperLink process: the gateway command, started, watched and stopped.

The SuperLink runs as ``python -m fedmed.flower.gateway`` (Flower's SuperLink app served on a
private 127.0.0.1 socket with everything and a public socket with only the Fleet API, see
:mod:`fedmed.flower.gateway`): ``fedmed-server`` talks to :attr:`SuperLink.address` (private),
sites connect to :attr:`SuperLink.fleet_address` (public). The process runs in the
environment of :func:`fedmed.flower.process.flower_env` and is stopped with its whole process
tree (:func:`fedmed.flower.process.stop_process`).

Example:
    >>> with SuperLink(config.server) as link:   # started, healthy
    ...     link.address, link.fleet_address
    ('127.0.0.1:9093', '127.0.0.1:9092')
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from types import TracebackType

from fedmed.config import ServerConfig
from fedmed.errors import SecurityError
from fedmed.flower.process import (
    flower_env,
    free_loopback_port,
    start_process,
    stop_process,
    wait_for_health,
)

__all__ = ["SuperLink", "public_limit_flags", "superlink_command"]

log = logging.getLogger(__name__)


def public_limit_flags(config: ServerConfig) -> list[str]:
    """The gateway's public port limit flags for ``config``'s ``[server]`` limit keys."""
    return [
        "--max-body-bytes",
        str(config.public_max_body_mib << 20),
        "--max-header-bytes",
        str(config.public_max_header_kib << 10),
        "--header-timeout",
        str(config.public_header_timeout_s),
        "--request-timeout",
        str(config.public_request_timeout_s),
        "--max-connections",
        str(config.public_max_connections),
        "--max-connections-per-peer",
        str(config.public_max_connections_per_peer),
        "--keep-alive-timeout",
        str(config.keep_alive_timeout_s),
    ]


def superlink_command(config: ServerConfig) -> list[str]:
    """The gateway command line (``flower-superlink`` flags after ``--``) for ``config``.

    Flower's ``--host/--port`` is the private loopback socket: its executor and server app
    connect there; the public socket is the gateway's ``--public-host/--public-port``.
    """
    if config.control_port is None:
        raise ValueError("choose config.control_port before building the command")
    state = config.state_dir
    command = [
        sys.executable,
        "-m",
        "fedmed.flower.gateway",
        "--public-host",
        config.host,
        "--public-port",
        str(config.port),
        *public_limit_flags(config),
        "--",
        "--host",
        "127.0.0.1",
        "--port",
        str(config.control_port),
        "--database",
        str(state / "superlink.db"),
        "--disable-runtime-dependency-installation",
    ]
    if config.insecure:
        return [*command, "--insecure"]
    return [
        *command,
        "--ssl-ca-certfile",
        str(config.ca_cert),
        "--ssl-certfile",
        str(config.server_cert),
        "--ssl-keyfile",
        str(config.server_key),
        "--enable-supernode-auth",
    ]


class SuperLink:
    """A SuperLink process (the gateway) owned by this object (context manager).

    The database ``state_dir/superlink.db`` keeps runs and site registrations across restarts.
    A ``config.control_port`` of None becomes a free loopback port at construction.
    """

    def __init__(self, config: ServerConfig) -> None:
        if config.control_port is None:
            config = dataclasses.replace(config, control_port=free_loopback_port())
        self.config = config
        self.home = config.state_dir / "flwr-home"
        self.log_file = config.state_dir / "logs" / "superlink.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:control-port``: the private socket (run submission, key registration)."""
        return self.config.local_address

    @property
    def fleet_address(self) -> str:
        """The public socket (Fleet API only) as seen from this machine: sites connect here."""
        return self.config.fleet_address

    def _check_files(self) -> None:
        if self.config.insecure:
            return
        for label, path in (
            ("ca-cert", self.config.ca_cert),
            ("server-cert", self.config.server_cert),
            ("server-key", self.config.server_key),
        ):
            if path is None or not path.is_file():
                raise SecurityError(
                    f"[server] {label} {path} does not exist: run `fedmed certs` and set "
                    "certs-dir in federation.toml"
                )

    def start(self) -> None:
        """Start the SuperLink and wait until it is healthy (``startup_timeout_s``)."""
        self._check_files()
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        if self.config.insecure:
            log.warning(
                "INSECURE: the SuperLink runs without TLS and without site authentication; "
                "anyone reaching %s can join or submit code. Use only for a local test.",
                self.address,
            )
        self.proc = start_process(
            superlink_command(self.config),
            env=flower_env(self.home),
            log_file=self.log_file,
            cwd=self.config.state_dir,
        )
        log.info(
            "SuperLink pid %d on %s:%d for sites (Fleet API only), control on %s (log %s)",
            self.proc.pid,
            self.config.host,
            self.config.port,
            self.address,
            self.log_file,
        )
        try:
            for address in (self.address, self.fleet_address):
                wait_for_health(
                    address,
                    ca_cert=self.config.ca_cert,
                    timeout=self.config.startup_timeout_s,
                    proc=self.proc,
                    log_file=self.log_file,
                )
        except BaseException:
            self.stop()
            raise

    def alive(self) -> bool:
        """Whether the SuperLink process is running."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop the SuperLink and its children (idempotent)."""
        if self.proc is not None:
            code = stop_process(self.proc)
            log.info("SuperLink pid %d stopped (exit code %s)", self.proc.pid, code)

    def __enter__(self) -> SuperLink:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
