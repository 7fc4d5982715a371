"""Start, watch and stop Flower's processes (SuperLink, SuperNode, simulation) on this machine.

Flower's SuperLink and SuperNode start further Flower commands (``flower-superexec``,
``flwr-serverapp``, ``flwr-clientapp``, ``flwr-simulation``) by name through ``PATH`` (the
SuperLink dies with exit code 3 when they are missing), so :func:`flower_env` puts this
interpreter's ``bin`` first. Each process gets its own ``FLWR_HOME``, telemetry off, no update
check and no runtime dependency installation (Flower would otherwise ``uv sync`` the app's
dependencies). Processes start in their own session so :func:`stop_process` can stop the whole
group (a SuperLink's executor and server-app children included) by process group id.

Both sides use these: ``fedmed.server.superlink`` (the SuperLink), ``fedmed.client.supernode``
(a site's SuperNode) and ``fedmed.simulation.engine`` (a simulation SuperLink).

Example:
    >>> proc = start_process(["flower-superlink", "--insecure"], env=flower_env(home),
    ...                      log_file=home / "superlink.log")
    >>> wait_for_health("127.0.0.1:9093", ca_cert=None, timeout=60, proc=proc)
    >>> stop_process(proc)
    0
"""

from __future__ import annotations

import contextlib
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
from typing import IO

import httpx

from fedmed.errors import FederationError
from fedmed.flower.speedups import switched_off

__all__ = [
    "descendants",
    "flower_env",
    "free_loopback_port",
    "process_alive",
    "start_process",
    "stop_process",
    "tail",
    "wait_for_health",
]

log = logging.getLogger(__name__)


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower process with its own ``FLWR_HOME`` under ``home``, plus
    ``extra``.

    Raises:
        ConfigError: ``FEDMED_FLOWER_WITHOUT`` names an unknown speed-up.
    """
    switched_off()  # a misspelt FEDMED_FLOWER_WITHOUT fails here, not in the Flower process
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
    env.update(extra or {})
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


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie or a dead process does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _terminate(pids: Sequence[int], *, timeout: float) -> None:
    """SIGTERM ``pids`` (not our children), SIGKILL those still alive after ``timeout`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        living = [pid for pid in pids if process_alive(pid)]
        for pid in living:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while living and time.monotonic() < deadline:
            time.sleep(0.1)
            living = [pid for pid in living if process_alive(pid)]
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
