"""Start, watch and stop Flower processes: the SuperLink here, SuperNodes through the client.

The SuperLink runs as ``python -m fedmed.server.gateway`` (Flower's SuperLink app served on a
private 127.0.0.1 socket with everything and a public socket with only the Fleet API, see
:mod:`fedmed.server.gateway`): ``fedmed-server`` talks to :attr:`SuperLink.address` (private),
sites connect to :attr:`SuperLink.fleet_address` (public).

Flower's SuperLink starts ``flower-superexec`` and ``flwr-serverapp`` by name through ``PATH``
(it dies with exit code 3 when they are missing), so :func:`flower_env` puts this interpreter's
``bin`` first. Each process gets its own ``FLWR_HOME``, telemetry off, no update check and no
runtime dependency installation (Flower would otherwise ``uv sync`` the app's dependencies).
Processes start in their own session so :func:`stop_process` can stop the whole group (the
SuperLink's executor and server-app children included) by process group id.

Example:
    >>> with SuperLink(config.server) as link:   # started, healthy
    ...     link.address, link.fleet_address
    ('127.0.0.1:9093', '127.0.0.1:9092')
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

from fedmed.config import ServerConfig
from fedmed.errors import FederationError, SecurityError

__all__ = [
    "SuperLink",
    "descendants",
    "flower_env",
    "free_loopback_port",
    "public_limit_flags",
    "start_process",
    "stop_process",
    "superlink_command",
    "tail",
    "wait_for_health",
]

log = logging.getLogger(__name__)


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower process with its own ``FLWR_HOME`` under ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env["FLWR_HOME"] = str(home)
    # Telemetry posts to Flower's servers: hospitals allow no unexpected egress.
    env["FLWR_TELEMETRY_ENABLED"] = os.environ.get("FEDMED_FLWR_TELEMETRY", "0")
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("RAY_TMPDIR", str(home / "ray"))
    env["UV_CACHE_DIR"] = str(home / "uv-cache")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def _pump(stream: IO[bytes], log_file: Path, echo: IO[str]) -> None:
    with stream, log_file.open("ab") as out:
        for line in iter(stream.readline, b""):
            out.write(line)
            out.flush()
            echo.write(line.decode(errors="replace"))
            echo.flush()


def start_process(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    log_file: Path,
    cwd: Path | None = None,
    echo: IO[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new session; stdout and stderr go to ``log_file`` (and ``echo``)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if echo is None:
        with log_file.open("ab") as out:
            proc = subprocess.Popen(
                list(command),
                env=dict(env),
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
    else:
        proc = subprocess.Popen(
            list(command),
            env=dict(env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert proc.stdout is not None  # PIPE was requested
        threading.Thread(
            target=_pump, args=(proc.stdout, log_file, echo), daemon=True, name="log-pump"
        ).start()
    log.debug("started pid %d: %s", proc.pid, " ".join(command))
    return proc


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 15.0) -> int | None:
    """SIGTERM the process group of ``proc``, SIGKILL it after ``timeout`` s; return the code.

    The group id is the pid because :func:`start_process` starts a new session. Descendants
    that started their own session (Flower's executor and its server app do) are signalled
    too, so no orphan keeps polling a stopped SuperLink.
    """
    detached = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop in %.0f s: killing its group", proc.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    # Children that outlived their parent (same group or their own session) must not linger.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    _terminate(detached, timeout=min(timeout, 5.0))
    return proc.returncode


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _terminate(pids: Sequence[int], *, timeout: float) -> None:
    """SIGTERM ``pids`` (not our children), SIGKILL those still alive after ``timeout`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        living = [pid for pid in pids if _alive(pid)]
        for pid in living:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while living and time.monotonic() < deadline:
            time.sleep(0.1)
            living = [pid for pid in living if _alive(pid)]
        if not living:
            return


def descendants(pid: int) -> list[int]:
    """Pids of every living descendant of ``pid`` (from /proc; [] where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        "fedmed.server.gateway",
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


def wait_for_health(
    address: str,
    *,
    ca_cert: Path | None,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    log_file: Path | None = None,
) -> None:
    """Poll ``GET /health`` until it answers 200; bounded by ``timeout`` seconds.

    Raises:
        FederationError: the process exited, or the endpoint did not answer in time.
    """
    scheme = "http" if ca_cert is None else "https"
    verify: ssl.SSLContext | bool = False
    if ca_cert is not None:
        verify = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    with httpx.Client(verify=verify, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                detail = tail(log_file) if log_file else ""
                raise FederationError(
                    f"the SuperLink exited with code {proc.returncode} while starting "
                    f"(log {log_file}):\n{detail}"
                )
            try:
                if client.get(f"{scheme}://{address}/health").status_code == 200:
                    return
                last_error = "unhealthy"
            except httpx.HTTPError as err:
                last_error = str(err) or type(err).__name__
            time.sleep(0.25)
    raise FederationError(
        f"the SuperLink at {address} did not answer /health within {timeout:.0f} s "
        f"({last_error}): see {log_file}"
    )


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
