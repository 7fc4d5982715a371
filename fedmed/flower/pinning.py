"""Sites run only the app they expect: the FAB's sha256 must be in the site's pin list.

Flower ships the app (FAB) from the server and runs it first on the site's ``sys.path``; its
only check (``--trusted-entities``) needs Flower Hub signatures. fedmed's FAB is a thin shim
whose bytes depend only on the fedmed version (:mod:`fedmed.flower.fab`), so a site pins the
sha256 of the shim its own installed fedmed builds plus any ``app-hash`` entries of its config
(``fedmed.client.supernode.site_pins``), and refuses every other app.

How: the SuperNode starts ``flwr-clientapp`` by name through ``PATH`` for every message.
:func:`install_wrapper` writes a ``flwr-clientapp`` script into the site's own ``bin`` folder
(first on the SuperNode's ``PATH``) that calls :func:`clientapp_main`: it wraps
``flwr.supernode.runtime.run_clientapp``'s ``pull_task_input`` (records the run) and
``install_from_fab`` (raises :class:`AppRefused` unless the FAB's sha256 is pinned), then runs
Flower's ``flwr-clientapp``. The check runs after ``pull_task_input`` returned, so Flower sends
the server an error reply for the message instead of leaving it to time out; the refused app is
never installed or imported. An unreadable pin file refuses everything.

It fails closed: before a site starts its SuperNode, :func:`verify_pinning` proves that Flower
will run the wrapper (the supported flwr version, Flower launching the ClientApp by the bare
command name, the wrapper first on the SuperNode's ``PATH``, and the runtime hooks there and
looked up at call time); the wrapper checks the hooks again before it runs. Otherwise the site
refuses to start with a :class:`~fedmed.errors.SecurityError` naming the flwr version.

Uses Flower internals (``tests/flower/test_pinning.py`` and ``tests/flower/test_flower_contract.py``
fail if they move).

Example:
    >>> pins = write_pins(config.state_dir / "app-pins.txt", site_pins(config.app_hashes))
    >>> wrapper = install_wrapper(config.state_dir / "bin", pins)
    >>> verify_pinning(env, wrapper)          # env: the SuperNode's environment
"""

from __future__ import annotations

import dis
import functools
import hashlib
import importlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from fedmed.errors import SecurityError
from fedmed.flower.version import check_flower_version, installed_flower_version

__all__ = [
    "CLIENTAPP_MODULES",
    "HOOKS",
    "RUNTIME_MODULE",
    "WRAPPED_COMMAND",
    "AppRefused",
    "check_fab",
    "check_runtime_hooks",
    "clientapp_main",
    "guard_runtime",
    "install_wrapper",
    "read_pins",
    "verify_pinning",
    "write_pins",
]

log = logging.getLogger(__name__)

WRAPPED_COMMAND = "flwr-clientapp"
RUNTIME_MODULE = "flwr.supernode.runtime.run_clientapp"
CLI_MODULE = "flwr.supernode.cli.flwr_clientapp"
# What a ClientApp process imports before it runs a message (warm start preloads them).
CLIENTAPP_MODULES = (CLI_MODULE, RUNTIME_MODULE)
# The runtime functions the guard replaces; run_clientapp must look them up at call time.
HOOKS = ("pull_task_input", "install_from_fab")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class AppRefused(PermissionError):
    """The server sent an app whose sha256 this site has not pinned."""


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


def _loads_global(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function``'s own code reads the module global ``name`` (at call time)."""
    return any(
        ins.opname == "LOAD_GLOBAL" and ins.argval == name for ins in dis.get_instructions(function)
    )


def _refuse(reason: str) -> SecurityError:
    return SecurityError(
        f"app pinning cannot be proven with flwr {installed_flower_version()}: {reason}; the "
        "site refuses to start rather than run any app the server ships (use a supported flwr "
        "version, and do not put another flwr-clientapp before the site's wrapper on PATH)"
    )


def check_runtime_hooks() -> ModuleType:
    """Prove that Flower's ``flwr-clientapp`` runs the functions :func:`guard_runtime` wraps;
    return the runtime module.

    Raises:
        SecurityError: a hook is missing, or Flower's code no longer looks it up at call time.
    """
    try:
        runtime = importlib.import_module(RUNTIME_MODULE)
        cli = importlib.import_module(CLI_MODULE)
    except ImportError as err:
        raise _refuse(f"Flower's ClientApp runtime is not where fedmed wraps it ({err})") from err
    for name in HOOKS:
        if not callable(getattr(runtime, name, None)):
            raise _refuse(f"{RUNTIME_MODULE} has no {name}() to guard")
        if not _loads_global(getattr(runtime, "run_clientapp", lambda: None), name):
            raise _refuse(f"{RUNTIME_MODULE}.run_clientapp does not call {name}() by name")
    if getattr(cli, "run_clientapp", None) is not getattr(runtime, "run_clientapp", None) or (
        not _loads_global(getattr(cli, "flwr_clientapp", lambda: None), "run_clientapp")
    ):
        raise _refuse(f"{CLI_MODULE}.flwr_clientapp does not run {RUNTIME_MODULE}.run_clientapp")
    return runtime


def verify_pinning(env: Mapping[str, str], wrapper: Path) -> None:
    """Prove, before a site starts its SuperNode with ``env``, that every message's ClientApp
    will run through ``wrapper`` (the site's pinned-app ``flwr-clientapp``).

    Raises:
        FederationError: the installed flwr is not a supported version.
        SecurityError: Flower launches the ClientApp another way, ``flwr-clientapp`` on the
            SuperNode's ``PATH`` resolves to another program, or a runtime hook moved.
    """
    check_flower_version()
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    command = TASK_TYPE_TO_COMMAND.get(TaskType.CLIENT_APP)
    if command != WRAPPED_COMMAND:
        raise _refuse(f"Flower launches the ClientApp as {command!r}, not {WRAPPED_COMMAND!r}")
    found = shutil.which(WRAPPED_COMMAND, path=env.get("PATH", ""))
    if found is None or not os.path.samefile(found, wrapper):
        raise _refuse(
            f"{WRAPPED_COMMAND} on the SuperNode's PATH resolves to {found}, not the site's "
            f"wrapper {wrapper}"
        )
    check_runtime_hooks()


def guard_runtime(pins_file: Path) -> None:
    """Wrap Flower's ClientApp runtime so that ``install_from_fab`` checks the pin list.

    Raises:
        SecurityError: the runtime's hooks moved (:func:`check_runtime_hooks`).
    """
    runtime = check_runtime_hooks()
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
    check_flower_version()
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
    (:mod:`fedmed.flower.warmstart`) and runs cold only when it is not reachable.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / WRAPPED_COMMAND
    if warm_socket is not None:
        from fedmed.flower.warmstart import WRAPPER_SOURCE

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
        "from fedmed.flower.pinning import clientapp_main\n\n"
        f"sys.exit(clientapp_main({str(pins_file.resolve())!r}))\n"
    )
    script.chmod(0o755)
    return script
