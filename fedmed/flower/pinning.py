"""Sites run only the app they expect: the FAB's sha256 must be in the site's pin list.

Flower ships the app (FAB) from the server and runs it first on the site's ``sys.path``; its
only check (``--trusted-entities``) needs Flower Hub signatures. fedmed's FAB is a thin shim
whose bytes depend only on the fedmed version (``fedmed.server.submit.build_fab``), so a site
pins the sha256 of the shim its own installed fedmed builds (:func:`installed_app_hash`) plus
any ``app-hash`` entries of its config, and refuses every other app.

How: the SuperNode starts ``flwr-clientapp`` by name through ``PATH`` for every message.
:func:`install_wrapper` writes a ``flwr-clientapp`` script into the site's own ``bin`` folder
(first on the SuperNode's ``PATH``) that calls :func:`clientapp_main`: it wraps
``flwr.supernode.runtime.run_clientapp``'s ``pull_task_input`` (records the run) and
``install_from_fab`` (raises :class:`PermissionError` unless the FAB's sha256 is pinned), then
runs Flower's ``flwr-clientapp``. The check runs after ``pull_task_input`` returned, so Flower
sends the server an error reply for the message instead of leaving it to time out; the refused
app is never installed or imported. An unreadable pin file refuses everything.

Uses Flower internals (flwr pinned to 1.41; ``tests/client/test_pinning.py`` fails if they move).

Example:
    >>> pins = site_pins(config)                      # installed app + config's app-hash
    >>> write_pins(config.state_dir / "app-pins.txt", pins)
    >>> install_wrapper(config.state_dir / "bin", config.state_dir / "app-pins.txt")
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "WRAPPED_COMMAND",
    "AppRefused",
    "check_fab",
    "clientapp_main",
    "guard_runtime",
    "install_wrapper",
    "installed_app_hash",
    "read_pins",
    "site_pins",
    "write_pins",
]

log = logging.getLogger("fedmed.client.pinning")

WRAPPED_COMMAND = "flwr-clientapp"
RUNTIME_MODULE = "flwr.supernode.runtime.run_clientapp"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class AppRefused(PermissionError):
    """The server sent an app whose sha256 this site has not pinned."""


def installed_app_hash() -> str:
    """sha256 of the shim app the installed fedmed builds (what an honest server sends)."""
    from fedmed.server.submit import build_fab

    return build_fab().hash_str


def site_pins(app_hashes: Iterable[str] = (), *, include_installed: bool = True) -> list[str]:
    """The installed app's hash (unless excluded) followed by ``app_hashes``, deduplicated."""
    pins = [installed_app_hash()] if include_installed else []
    for digest in app_hashes:
        if digest not in pins:
            pins.append(digest)
    return pins


def write_pins(path: Path, pins: Iterable[str]) -> Path:
    """Write one sha256 per line to ``path`` (read by the wrapper at every message)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{digest}\n" for digest in pins))
    return path


def read_pins(path: Path) -> frozenset[str]:
    """The sha256 digests in ``path`` (blank lines and ``#`` comments ignored).

    Raises:
        OSError: the file cannot be read.
        ValueError: a line is not a sha256 hex digest.
    """
    pins = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not _SHA256.match(text):
            raise ValueError(f"{path}:{number}: {text!r} is not a sha256 hex digest")
        pins.add(text)
    return frozenset(pins)


def check_fab(content: bytes, pins_file: Path) -> str:
    """Return the FAB's sha256 if it is pinned in ``pins_file``.

    Raises:
        AppRefused: not pinned, or the pin file is unreadable (then everything is refused).
    """
    digest = hashlib.sha256(content).hexdigest()
    try:
        pins = read_pins(pins_file)
    except (OSError, ValueError) as err:
        raise AppRefused(
            f"site refuses app sha256 {digest}: its pin list {pins_file} is unreadable ({err}); "
            "every app is refused until fedmed-client rewrites it"
        ) from err
    if digest not in pins:
        raise AppRefused(
            f"site refuses app sha256 {digest}: not in its pin list {pins_file} (the fedmed "
            "app of this site's fedmed version or an app-hash of its config); a different "
            "fedmed version or a tampered app was submitted"
        )
    return digest


def guard_runtime(pins_file: Path) -> None:
    """Wrap Flower's ClientApp runtime so that ``install_from_fab`` checks the pin list."""
    runtime = importlib.import_module(RUNTIME_MODULE)
    pull: Callable[..., Any] = runtime.pull_task_input
    install: Callable[..., Any] = runtime.install_from_fab
    seen: dict[str, Any] = {}

    @functools.wraps(pull)
    def pull_task_input(*args: Any, **kwargs: Any) -> Any:
        message, context, run, fab = pull(*args, **kwargs)
        seen["run"], seen["fab_hash"] = run.run_id, fab.hash_str
        return message, context, run, fab

    @functools.wraps(install)
    def install_from_fab(content: bytes, *args: Any, **kwargs: Any) -> Any:
        try:
            digest = check_fab(content, pins_file)
        except AppRefused as err:
            log.error("run %s: %s", seen.get("run", "?"), err)
            raise
        if seen.get("fab_hash") not in (None, digest):
            raise AppRefused(f"FAB hash {seen['fab_hash']} does not match its content {digest}")
        log.info("run %s: app sha256 %s is pinned: running it", seen.get("run", "?"), digest[:12])
        return install(content, *args, **kwargs)

    runtime.pull_task_input = pull_task_input
    runtime.install_from_fab = install_from_fab


def clientapp_main(pins_file: str | os.PathLike[str]) -> int:
    """Entry of the site's ``flwr-clientapp`` wrapper: guard, then run Flower's command."""
    if not log.handlers:  # only this module's lines; Flower configures its own logger
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    guard_runtime(Path(pins_file))
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()
    return 0


def install_wrapper(
    bin_dir: Path,
    pins_file: Path,
    *,
    python: str | None = None,
    warm_socket: Path | None = None,
) -> Path:
    """Write ``bin_dir/flwr-clientapp`` (put ``bin_dir`` first on the SuperNode's PATH).

    With ``warm_socket`` the script asks the warm fork server there
    (:mod:`fedmed.client.warmstart`) and runs cold only when it is not reachable.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / WRAPPED_COMMAND
    if warm_socket is not None:
        from fedmed.client.warmstart import WRAPPER_SOURCE

        source = WRAPPER_SOURCE.format(
            pins=str(pins_file.resolve()), sock=str(warm_socket.resolve())
        )
        script.write_text(f"#!{python or sys.executable}\n{source}")
        script.chmod(0o755)
        return script
    script.write_text(
        f"#!{python or sys.executable}\n"
        '"""fedmed: Flower\'s flwr-clientapp, refusing apps not pinned by this site."""\n'
        "import sys\n\n"
        "from fedmed.client.pinning import clientapp_main\n\n"
        f"sys.exit(clientapp_main({str(pins_file.resolve())!r}))\n"
    )
    script.chmod(0o755)
    return script
