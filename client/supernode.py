"""Run a site's Flower SuperNode and keep it running: restart with backoff when it exits.

A SuperNode exits (code 305) when the SuperLink refuses its activation, e.g. after a server
restart while the site still counts as online (for about a minute), and retries on its own while
the server is unreachable. :class:`SiteNode` restarts it with exponential backoff, at most
``max-restarts`` times in a row (the count resets after a SuperNode stayed up for a while).
A SuperNode that stopped working but would stay alive (Flower's pull loop or heartbeat thread
ended on an HTTP 500 from the SuperLink) exits by itself (:mod:`fedmed.flower.liveness`) and
is restarted the same way. It heartbeats every ``[connection] heartbeat-interval`` s (Flower's
30 s by default): the server counts a site gone after two missed heartbeats.

The SuperNode gets the site's ``--node-config`` as a TOML file (``state-dir/node-config.toml``):
keys ``site``, ``data-dir``, ``cache-dir``, ``cache-mode``, ``device``, ``seed``, which the
client app reads from ``context.node_config``.

Before each start the site's app pin list (``state-dir/app-pins.txt``: the app its installed
fedmed builds, :func:`installed_app_hash`, plus the config's ``app-hash`` list) and a
``flwr-clientapp`` wrapper (``state-dir/bin``, first on the SuperNode's ``PATH``) are written,
so the SuperNode runs only apps whose sha256 the site pinned (:mod:`fedmed.flower.pinning`);
the site refuses to start when it cannot prove that Flower will run that wrapper
(:func:`fedmed.flower.pinning.verify_pinning`). The idle
SuperNode polls every ``[connection] poll-interval`` s (:mod:`fedmed.flower.fastpoll`;
Flower's hard-coded 3 s). With ``warm-start`` (default) a fork server next to the SuperNode
keeps torch, flwr and fedmed imported and each message's ``flwr-clientapp`` is forked from it
(:mod:`fedmed.flower.warmstart`).

Example:
    >>> SiteNode(load_site_config(Path("configs/sites/A.toml"), site="A")).run()
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmed.errors import FederationError, SecurityError
from fedmed.flower.liveness import GUARD_PREFIX
from fedmed.flower.pinning import install_wrapper, verify_pinning, write_pins
from fedmed.flower.process import flower_env, start_process, stop_process, tail
from fedmed.site_config import SiteConfig

__all__ = [
    "SiteNode",
    "installed_app_hash",
    "node_env",
    "site_pins",
    "supernode_command",
    "write_node_config",
]

log = logging.getLogger(__name__)

# flwr_exit logs "Exit Code: 305" and "[code: 2004] ..." but the process exits with 1.
_FLOWER_EXIT = re.compile(r"Exit Code: (\d+)")
_FLOWER_API_CODE = re.compile(r"\[code: (\d+)\]\s*([^\n]*)")
# The liveness guard's line when a SuperNode stopped working but would have stayed alive.
_GUARD = re.compile(re.escape(GUARD_PREFIX) + r"\s*([^\n]*)")
_STABLE_S = 120.0  # a SuperNode up this long counts as a healthy start: reset the restart count
_PINS_ENV = "FEDMED_APP_PINS"
_MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 108 bytes
CLIENT_APP_MODULE = "fedmed.client.app"  # preloaded by the warm-start server


def installed_app_hash() -> str:
    """sha256 of the shim app the installed fedmed builds (what an honest server sends)."""
    # The app declares every run setting with its default (RunSettings), so they decide its
    # bytes: the site hashes the same library defaults the server ships.
    from fedmed.flower.fab import fab_from_files, shim_files
    from fedmed.runsettings import RunSettings

    return fab_from_files(shim_files(RunSettings().to_run_config())).hash_str


def site_pins(app_hashes: Iterable[str] = (), *, include_installed: bool = True) -> list[str]:
    """The installed app's hash (unless excluded) followed by ``app_hashes``, deduplicated."""
    pins = [installed_app_hash()] if include_installed else []
    for digest in app_hashes:
        if digest not in pins:
            pins.append(digest)
    return pins


def warm_socket(config: SiteConfig) -> Path | None:
    """The warm-start socket of a site (None when off or the path is too long for AF_UNIX)."""
    path = config.state_dir / "clientapp.sock"
    return path if config.warm_start and len(str(path)) < _MAX_SOCKET_PATH else None


def node_env(config: SiteConfig) -> dict[str, str]:
    """The SuperNode's environment: the site's pinned ``flwr-clientapp`` first on ``PATH``.

    Raises:
        FederationError: the installed flwr is not a supported version.
        SecurityError: Flower would not run the wrapper (:func:`verify_pinning`).
    """
    pins = write_pins(config.state_dir / "app-pins.txt", site_pins(config.app_hashes))
    wrapper = install_wrapper(config.state_dir / "bin", pins, warm_socket=warm_socket(config))
    env = flower_env(config.state_dir / "flwr-home")
    env["PATH"] = os.pathsep.join([str(wrapper.parent), env["PATH"]])
    env[_PINS_ENV] = str(pins)
    verify_pinning(env, wrapper)
    return env


def write_node_config(config: SiteConfig) -> Path:
    """Write the site's node config as TOML for ``--node-config``; return its path."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    path = config.state_dir / "node-config.toml"
    lines = []
    for key, value in config.node_config().items():
        # A JSON string is a valid TOML basic string (same escapes); ints print alike.
        lines.append(f'"{key}" = {json.dumps(value)}')
    path.write_text("\n".join(lines) + "\n")
    return path


def supernode_command(config: SiteConfig, node_config_file: Path) -> list[str]:
    """The SuperNode command line for a site: Flower's ``flower-supernode`` run through
    :mod:`fedmed.flower.liveness` (heartbeat every ``[connection] heartbeat-interval``, exit
    when it stops working) and :mod:`fedmed.flower.fastpoll` (idle poll ``[connection]
    poll-interval`` instead of 3 s)."""
    command = [
        sys.executable,
        "-m",
        "fedmed.flower.liveness",
        "--heartbeat-interval",
        str(config.heartbeat_interval_s),
        "--poll-interval",
        str(config.poll_interval_s),
        "--",
        "--superlink",
        config.server_address,
        "--node-config",
        str(node_config_file),
        "--port",
        str(config.runtime_port),
    ]
    if config.insecure:
        return [*command, "--insecure"]
    return [
        *command,
        "--root-certificates",
        str(config.ca_cert),
        "--auth-supernode-private-key",
        str(config.private_key),
    ]


class SiteNode:
    """A site's SuperNode under supervision (restart loop with bounded exponential backoff).

    ``stop()`` (from another thread or a signal handler's caller) ends :meth:`run`.
    """

    def __init__(
        self,
        config: SiteConfig,
        *,
        echo: IO[str] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config
        self.echo = echo
        self.log_file = config.state_dir / "logs" / "supernode.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.warm: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._log_offset = 0
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait

    def _check_files(self) -> None:
        if self.config.insecure:
            return
        files = (("ca-cert", self.config.ca_cert), ("private-key", self.config.private_key))
        for label, path in files:
            if path is None or not path.is_file():
                raise SecurityError(
                    f"{self.config.path}: [connection] {label} {path} does not exist: copy the "
                    "file from the coordinator's `fedmed certs` output"
                )
        key_path = self.config.private_key
        try:
            key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as err:
            raise SecurityError(
                f"{self.config.path}: [connection] private-key {key_path} is not an OpenSSH "
                f"private key ({err}): use the siteX.key written by `fedmed certs`"
            ) from err
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SecurityError(
                f"{self.config.path}: [connection] private-key {key_path} is not an EC key: "
                "Flower's site authentication needs one; use `fedmed certs`"
            )

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before restart number ``attempt`` (1-based)."""
        delay = self.config.backoff_initial_s * 2 ** (attempt - 1)
        return min(delay, self.config.backoff_max_s)

    def start(self) -> subprocess.Popen[bytes]:
        """Start one SuperNode process (not supervised)."""
        self._check_files()
        node_config = write_node_config(self.config)
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        env = node_env(self.config)
        sock = warm_socket(self.config)
        if sock is not None and (self.warm is None or self.warm.poll() is not None):
            # Preloads torch/flwr/fedmed once; each message's flwr-clientapp is forked from it.
            self.warm = start_process(
                [
                    sys.executable,
                    "-m",
                    "fedmed.flower.warmstart",
                    str(sock),
                    env[_PINS_ENV],
                    CLIENT_APP_MODULE,
                ],
                env=env,
                log_file=self.config.state_dir / "logs" / "warmstart.log",
                cwd=self.config.state_dir,
            )
        self.proc = start_process(
            supernode_command(self.config, node_config),
            env=env,
            log_file=self.log_file,
            cwd=self.config.state_dir,
            echo=self.echo,
        )
        log.info(
            "site %s: SuperNode pid %d -> %s (log %s)",
            self.config.site,
            self.proc.pid,
            self.config.server_address,
            self.log_file,
        )
        return self.proc

    def exit_reason(self) -> str:
        """Flower's exit code and API error of the last SuperNode, from its log ('' if none)."""
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(self._log_offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        parts = []
        if guard := _GUARD.findall(text):
            parts.append(f"stopped working: {guard[-1].strip()}")
        if codes := _FLOWER_EXIT.findall(text):
            parts.append(f"Flower exit code {codes[-1]}")
        if api := _FLOWER_API_CODE.findall(text):
            parts.append(f"[code {api[-1][0]}] {api[-1][1].strip()}")
        return "; ".join(parts)

    def run(self) -> int:
        """Run the SuperNode until :meth:`stop`; restart it when it exits.

        Returns 0 after :meth:`stop`.

        Raises:
            FederationError: it exited ``max-restarts`` times in a row.
        """
        failures = 0
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                proc = self.start()
                while proc.poll() is None and not self._stopping.is_set():
                    self._stopping.wait(0.5)
                if self._stopping.is_set():
                    break
                code = proc.returncode
                if time.monotonic() - started >= _STABLE_S:
                    failures = 0
                failures += 1
                reason = self.exit_reason()
                hint = f" ({reason})" if reason else ""
                if failures > self.config.max_restarts:
                    raise FederationError(
                        f"site {self.config.site}: the SuperNode exited with code {code}{hint} "
                        f"{failures} times in a row; giving up (raise [connection] max-restarts "
                        f"to retry longer). If the key is not registered at the server, ask the "
                        f"coordinator to add it. Last log lines ({self.log_file}):\n"
                        f"{tail(self.log_file, 12)}"
                    )
                delay = self.backoff(failures)
                log.warning(
                    "site %s: SuperNode exited with code %s%s; restart %d/%d in %.1f s",
                    self.config.site,
                    code,
                    hint,
                    failures,
                    self.config.max_restarts,
                    delay,
                )
                self.restarts += 1
                self._sleep(delay)
        finally:
            self.stop_process()
        return 0

    def stop(self) -> None:
        """Ask :meth:`run` to end (it stops the SuperNode)."""
        self._stopping.set()

    def stop_process(self) -> None:
        """Stop the current SuperNode process and the warm-start server, if any."""
        if self.proc is not None and self.proc.poll() is None:
            code = stop_process(self.proc)
            log.info(
                "site %s: SuperNode pid %d stopped (%s)", self.config.site, self.proc.pid, code
            )
        if self.warm is not None and self.warm.poll() is None:
            stop_process(self.warm, timeout=5)
