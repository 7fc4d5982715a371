"""A warm fork server for the site's ``flwr-clientapp``: no torch import per message.

Flower starts a fresh ``flwr-clientapp`` process for every message; importing torch, MONAI,
flwr and fedmed costs about 4 s of CPU (2.5 s wall on an idle machine, 20+ s on a loaded one)
before the handler runs. :func:`serve` imports all that once (:data:`PRELOAD` and the app
modules it is given), then forks a child per request;
the site's ``flwr-clientapp`` wrapper (:func:`fedmed.flower.pinning.install_wrapper`) is a
small script that hands its argv, environment, working folder and stdin/stdout/stderr to the
server over a Unix socket (``SCM_RIGHTS``), forwards SIGTERM/SIGINT to the child and exits
with the child's exit code. The child runs exactly what the plain wrapper runs
(:func:`fedmed.flower.pinning.clientapp_main`: pin check, then Flower's ``flwr-clientapp``).
When the server is not reachable the wrapper runs ``clientapp_main`` itself (cold start).

The server forks only while it has a single thread (checked: otherwise it warns and exits,
and every message starts cold, as with stock Flower), and never runs torch code before
forking. ``FEDMED_FLOWER_WITHOUT=warmstart`` switches it off (:mod:`fedmed.flower.speedups`).
Its children retry a message's not-yet-available objects after 0.05 s instead of Flower's 1 s
(:func:`fedmed.flower.fastpoll.shorten_pull_backoff`): the SuperNode offers the message to its
ClientApp before it has pulled all of the message's objects from the server.

Example (what :class:`fedmed.client.supernode.SiteNode` starts next to its SuperNode)::

    python -m fedmed.flower.warmstart /site/state/clientapp.sock /site/state/app-pins.txt \\
        fedmed.client.app
"""

from __future__ import annotations

import array
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from fedmed.flower.pinning import CLIENTAPP_MODULES
from fedmed.flower.speedups import drifted, enabled

__all__ = ["PRELOAD", "WRAPPER_SOURCE", "main", "serve"]

log = logging.getLogger(__name__)

# Imported before the app modules :func:`serve` is given (the site's ClientApp, e.g.
# ``fedmed.client.app``, named by its caller: this library module does not import the apps).
PRELOAD = ("fedmed.flower.pinning", *CLIENTAPP_MODULES)
_MAX_REQUEST = 1 << 20
_FDS = 3

# The site's flwr-clientapp: stdlib only, so that it starts in milliseconds.
WRAPPER_SOURCE = '''\
"""fedmed: Flower's flwr-clientapp, refusing apps not pinned by this site (warm start)."""
import array, json, os, signal, socket, sys

PINS, SOCKET = {pins!r}, {sock!r}


def cold():
    from fedmed.flower.pinning import clientapp_main

    sys.exit(clientapp_main(PINS))


try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(SOCKET)
except OSError:
    cold()
request = json.dumps({{"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}})
fds = array.array("i", [0, 1, 2])
conn.sendmsg([request.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
reader = conn.makefile("r")
started = False
for line in reader:  # "pid N" from the server, then "code N" from the child (either order)
    kind, _, value = line.partition(" ")
    if kind == "pid":
        started, child = True, int(value)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda number, frame, child=child: os.kill(child, number))
    elif kind == "code":
        sys.exit(int(value))
if not started:
    cold()
sys.exit(1)  # the child died without reporting (killed)
'''


def _child(conn: socket.socket, request: dict, fds: Sequence[int], pins: Path) -> None:
    """In the forked child: become the requested flwr-clientapp, report its exit code."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = list(request["argv"])
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        logging.getLogger().handlers.clear()  # the server's; Flower logs through its own
        from fedmed.flower.pinning import clientapp_main

        code = clientapp_main(pins)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # the child must never return into the server loop
        logging.getLogger(__name__).exception("flwr-clientapp failed")
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(f"code {code}\n".encode())
        finally:
            os._exit(code)


def serve(sock_path: Path, pins: Path, apps: Sequence[str] = ()) -> None:
    """Preload :data:`PRELOAD` and ``apps`` (module names), listen on ``sock_path`` and fork
    one flwr-clientapp per request (forever).

    Returns at once, listening on nothing, when the speed-up ``warmstart`` is switched off or
    threads run after preloading (a Flower that starts one on import: one warning): the
    site's wrapper then starts each flwr-clientapp cold, as Flower does.
    """
    if not enabled("warmstart"):
        return
    preload = (*PRELOAD, *apps)
    for name in preload:
        importlib.import_module(name)
    from fedmed.flower.fastpoll import shorten_pull_backoff

    shorten_pull_backoff()
    if threading.active_count() != 1:  # a fork copies other threads' locks half-held
        drifted(
            "warmstart",
            f"{threading.active_count() - 1} thread(s) run after importing {', '.join(preload)} "
            "and a fork is only safe from a single thread",
        )
        return
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    sock_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    os.chmod(sock_path, 0o600)
    server.listen(8)
    log.info("warm start ready on %s (preloaded %s)", sock_path, ", ".join(preload))
    while True:
        conn, _ = server.accept()
        fds: list[int] = []
        try:
            data, ancillary, _, _ = conn.recvmsg(
                _MAX_REQUEST, socket.CMSG_SPACE(_FDS * array.array("i").itemsize)
            )
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            request = json.loads(data.decode())
            if len(fds) != _FDS:
                raise ValueError(f"expected {_FDS} file descriptors, got {len(fds)}")
        except (OSError, ValueError) as err:
            log.warning("bad warm-start request: %s", err)
            for fd in fds:
                os.close(fd)
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            server.close()
            _child(conn, request, fds, pins)
        for fd in fds:
            os.close(fd)
        try:
            conn.sendall(f"pid {pid}\n".encode())
        except OSError:
            os.kill(pid, signal.SIGTERM)
        conn.close()
        log.info("forked flwr-clientapp pid %d", pid)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fedmed.flower.warmstart SOCKET PINS [MODULE ...]`` (MODULE: app modules to
    preload, e.g. ``fedmed.client.app``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        raise SystemExit("usage: python -m fedmed.flower.warmstart SOCKET PINS [MODULE ...]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(Path(args[0]), Path(args[1]), args[2:])


if __name__ == "__main__":
    main()
