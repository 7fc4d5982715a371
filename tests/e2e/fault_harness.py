"""Fault scenarios with real fedmed-server / fedmed-client processes on 127.0.0.1 (TLS + keys).

Shared by ``test_faults*.py`` and ``test_privacy*.py``: each scenario runs once per pytest
run, also under pytest-xdist (one worker runs it, the others wait for its outcome, see
:func:`_once`), leaves its folder behind for the tests to read and stops every process it
started, by pid, before it returns (SIGTERM to each process group, then SIGKILL to any
survivor, including grandchildren recorded while they ran).

Scenario "site faults" (:func:`site_fault_run`): sites A, B, C (min-sites 2) run
``fedmed_fault_app`` (production handlers + recording and fault mods); site D has a broken data
folder. C sends NaN weights in round 1 and a wrong-shaped array in round 2 attempt 1; B is
slow in round 2 attempt 1 and the test SIGKILLs its whole fedmed-client mid-round, so that
attempt fails (only A is valid; B's reply is Flower's "Node Unavailable" error once its heartbeat
expired: sites heartbeat every :data:`HEARTBEAT_S` = 10 s, so 16-20 s after the kill) and attempt
2, sent only to the sites online then, completes with A and C. B is started again as soon as
attempt 1 failed and rejoins for a later round.

Scenario "server restart" (:func:`server_restart_run`): sites A and B with the production app;
fedmed-server and every process under it are SIGKILLed while round 2 is in flight, then
fedmed-server is started again with the same config, state and output folders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmed.flower.process import descendants
from fedmed.security.pki import write_pki

__all__ = [
    "HEARTBEAT_S",
    "ROUND_TIMEOUT",
    "FaultRun",
    "app_hash",
    "read_jsonl",
    "server_restart_run",
    "site_fault_run",
]

BIN = Path(sys.executable).parent
E2E_DIR = Path(__file__).resolve().parent
FAULT_APP = "fedmed_fault_app:app"
RECORD_ENV = "FEDMED_E2E_RECORD_DIR"
SLOW_MARK = "FEDMED-E2E slow B"
ROUND_TIMEOUT = 300.0  # a cold clientapp takes ~50 s at load 10, minutes at load 30
# Sites heartbeat every 10 s (Flower's shortest; its default is 30 s): a killed site counts as
# gone after 16-20 s instead of 34-60 s, and a restarted server lets sites rejoin that much sooner.
HEARTBEAT_S = 10.0
# bound of each wait for a step of a scenario; a saturated machine (load 20) needs minutes
WAIT = 900.0
_SUPERNODE_PID = re.compile(r"SuperNode pid (\d+)")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` ([] while it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- processes ----------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None  # field 22 of stat: start time since boot


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class Procs:
    """Processes started by a scenario; :meth:`close` stops all of them by pid."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.started: list[subprocess.Popen[bytes]] = []
        self.seen: dict[int, str] = {}  # pid -> start time (a reused pid is left alone)

    def start(self, args: list[str], log: Path, **extra_env: str) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                args,
                env={**self.env, **extra_env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append(proc)
        return proc

    def remember(self) -> None:
        """Note every live descendant, so teardown can reach orphans later."""
        for proc in self.started:
            if proc.poll() is None:
                self._note(descendants(proc.pid))

    def _note(self, pids: list[int]) -> None:
        for pid in pids:
            if (started := _start_time(pid)) is not None:
                self.seen[pid] = started

    def kill_tree(self, proc: subprocess.Popen[bytes]) -> list[int]:
        """SIGKILL ``proc`` and everything below it at once (a crash); return the pids."""
        pids = [proc.pid, *descendants(proc.pid)]
        for pid in pids:
            _kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return pids

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int | None:
        """SIGTERM ``proc``'s process group, SIGKILL after ``timeout``; its exit code."""
        return self.stop_all([proc], timeout)[0]

    def stop_all(self, procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> list:
        """:meth:`stop` several at once (SIGTERM to all, then wait): they shut down in parallel."""
        for proc in procs:
            if proc.poll() is None:
                self._note(descendants(proc.pid))
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in procs:
            if proc.poll() is None:  # still running after the grace period
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        return [proc.returncode for proc in procs]

    def alive(self) -> list[int]:
        """Pids noted by :meth:`remember` (or a stop) that still run: what a stop left behind."""
        return [pid for pid, started in self.seen.items() if _start_time(pid) == started]

    def close(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)
        time.sleep(0.5)
        for pid in self.alive():  # SuperLink, SuperNodes, apps left behind
            _kill(pid, signal.SIGKILL)


def wait_until(check: Callable[[], Any], *, timeout: float, what: str, poll: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


# -- configs ------------------------------------------------------------------------------
def make_demo_data(out: Path, sites: int) -> Path:
    """Tiny demo federation (32x32x8 volumes, 3 cases per site, 1 held-out case), the same
    files as ``fedmed demo-data OUT --sites N --cases 3 --holdout 1 --shape 32 32 8``."""
    from fedmed.data.demo import generate_demo_federation

    generate_demo_federation(out, sites=sites, cases=3, seed=0, shape=(32, 32, 8), holdout=1)
    return out


def app_hash(*, server_module: str, client_module: str) -> str:
    """sha256 of the shim app fedmed-server would ship for these modules, computed the way a
    freshly started process sees the tree (the FAB embeds the defaults of
    fedmed/runsettings/settings.py, which may have changed on disk since this pytest process
    imported them)."""
    code = (
        "from fedmed.server.submit import build_fab\n"
        f"print(build_fab(server_module={server_module!r}, client_module={client_module!r})"
        ".hash_str)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    return done.stdout.strip()


def _app_hash(client_app: str) -> str | None:
    """sha256 of the app the server ships with ``client_app`` (sites must pin it)."""
    from fedmed.site_config import SiteConfig

    if "app_hashes" not in {f.name for f in dataclasses.fields(SiteConfig)}:
        return None
    return app_hash(server_module="fedmed.server.app", client_module=client_app)


def write_configs(
    root: Path,
    data: Path,
    *,
    allowed: list[str],
    sites: dict[str, Path],
    app: dict[str, Any],
    client_app: str | None = None,
) -> tuple[Path, dict[str, Path]]:
    """federation.toml (TLS, keys of ``allowed``) and one config per site in ``sites``."""
    pki = write_pki(root / "certs", server_hosts=["127.0.0.1"], sites=sorted(set(sites)))
    port = free_port()
    app_lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in app.items())
    allow = "".join(f'{s} = "certs/site{s}.pub"\n' for s in allowed)
    federation = root / "federation.toml"
    federation.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nstate-dir = "state"\n'
        f'certs-dir = "certs"\nmin-sites = 2\nwait-for-sites = 300.0\nrun-timeout = 3600.0\n'
        + (f'client-app = "{client_app}"\n' if client_app else "")
        + f"[server.sites]\n{allow}[app]\n{app_lines}"
    )
    pin = _app_hash(client_app) if client_app else None
    configs = {}
    for site, folder in sites.items():
        configs[site] = root / f"{site}.toml"
        configs[site].write_text(
            f'site = "{site}"\ndata-dir = "{folder}"\nstate-dir = "site-{site}"\n'
            "check-data = true\n"
            + (f'app-hash = ["{pin}"]\n' if pin else "")
            + f'[connection]\nserver-address = "127.0.0.1:{port}"\nca-cert = "certs/ca.pem"\n'
            f'private-key = "{pki.site_private_keys[site]}"\nruntime-port = {free_port()}\n'
            "backoff-initial = 1.0\nbackoff-max = 2.0\nmax-restarts = 60\n"
            f"heartbeat-interval = {HEARTBEAT_S}\n"
        )
    return federation, configs


def _app_config(data: Path, rounds: int) -> dict[str, Any]:
    return {
        "num-rounds": rounds,
        "model": "coplenet",
        "model-features": "4,8,16,32,64",
        "patch-size": "32,32",
        "local-steps": 1,
        "batch-size": 1,
        "val-fraction": 0.25,
        "round-timeout": ROUND_TIMEOUT,
        "join-timeout": 300.0,
        "retry-failed-rounds": 4,
        "data-dir": str(data / "holdout"),
        "out-dir": "out",
    }


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(E2E_DIR), env.get("PYTHONPATH")) if p)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    return env


@dataclass(frozen=True)
class FaultRun:
    """What a scenario left: exit codes, logs (text) and folders to inspect."""

    root: Path
    data: Path
    server_codes: list[int | None]
    server_log: str
    site_codes: dict[str, list[int | None]]
    site_logs: dict[str, str]
    events: dict[str, float]
    notes: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.out / "metrics.jsonl")

    @property
    def records(self) -> Path:
        return self.root / "outgoing"


@contextlib.contextmanager
def _procs() -> Iterator[Procs]:
    procs = Procs(_env())
    try:
        yield procs
    finally:
        procs.close()


def _shared_root(root: Path) -> Path:
    """``root`` moved out of a pytest-xdist worker's own temp folder (``.../popen-gwN/x``) into
    the one all workers of the run share (``.../x``), so each scenario runs once per run."""
    if os.environ.get("PYTEST_XDIST_WORKER") and root.parent.name.startswith("popen-gw"):
        return root.parent.parent / root.name
    return root


def _dump(run: FaultRun) -> str:
    fields = dataclasses.asdict(run)
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in fields.items()})


def _load(text: str) -> FaultRun:
    fields = json.loads(text)
    if "error" in fields:
        raise AssertionError(f"the scenario failed (in another pytest worker): {fields['error']}")
    return FaultRun(**{**fields, "root": Path(fields["root"]), "data": Path(fields["data"])})


def _once(scenario: Callable[[Path], FaultRun]) -> Callable[[Path], FaultRun]:
    """Run ``scenario`` once per folder and pytest run, also across pytest-xdist workers (the
    first caller runs it under a file lock, the others wait and read its outcome); a failure
    is raised again, not retried."""

    @functools.wraps(scenario)
    def wrapper(root: Path) -> FaultRun:
        root = _shared_root(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        outcome = root.parent / f"{root.name}.outcome.json"
        with (root.parent / f"{root.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held while the scenario runs: others wait
            if not outcome.exists():
                try:
                    run = scenario(root)
                except Exception as err:
                    outcome.write_text(json.dumps({"error": f"{type(err).__name__}: {err}"}))
                    raise
                outcome.write_text(_dump(run))
        return _load(outcome.read_text())

    return wrapper


def _client(root: Path, site: str, config: Path) -> list[str]:
    return [str(BIN / "fedmed-client"), "--site", site, "--config", str(config)]


def _ok_rounds(out: Path) -> set[int]:
    return {r["round"] for r in read_jsonl(out / "metrics.jsonl") if r.get("status") == "ok"}


def _break_site(source: Path, target: Path) -> Path:
    """A copy of ``source`` with one label truncated (unreadable)."""
    shutil.copytree(source, target)
    label = sorted((target / "labelsTr").iterdir())[1]
    label.write_bytes(label.read_bytes()[:100])
    return label


@_once
def site_fault_run(root: Path) -> FaultRun:
    """Run the "site faults" scenario in ``root`` (once per pytest run)."""
    data = make_demo_data(root / "data", 3)
    broken = _break_site(data / "site-A", data / "site-D")
    folders = {s: data / f"site-{s}" for s in "ABCD"}
    federation, configs = write_configs(
        root, data, allowed=["A", "B", "C"], sites=folders,
        app=_app_config(data, 4), client_app=FAULT_APP,
    )  # fmt: skip
    logs = {s: root / f"client-{s}.log" for s in "ABCD"}
    events: dict[str, float] = {"start": time.monotonic()}
    with _procs() as procs:
        server = procs.start(
            [str(BIN / "fedmed-server"), "--config", str(federation)], root / "server.log"
        )
        record = {RECORD_ENV: str(root / "outgoing")}
        clients = {s: procs.start(_client(root, s, configs[s]), logs[s], **record) for s in "ABCD"}
        codes: dict[str, list[int | None]] = {s: [] for s in "ABCD"}
        codes["D"].append(clients["D"].wait(timeout=90))
        events["D-exited"] = time.monotonic()
        wait_until(lambda: SLOW_MARK in _text(logs["B"]), timeout=WAIT, what="round 2 at site B")
        procs.remember()
        events["B-killed"] = time.monotonic()
        procs.kill_tree(clients["B"])
        codes["B"].append(clients["B"].returncode)
        failed = "round 2 attempt 1 failed"
        wait_until(lambda: failed in _text(root / "server.log"), timeout=WAIT, what=failed)
        events["attempt-failed"] = time.monotonic()
        with logs["B"].open("a") as fh:
            fh.write("\n===== FEDMED-E2E restart of site B =====\n")
        clients["B"] = procs.start(_client(root, "B", configs["B"]), logs["B"], **record)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=2 * WAIT)
        events["server-exited"] = time.monotonic()
        procs.remember()
        server_code = procs.stop(server)
        for site, code in zip("ABC", procs.stop_all([clients[s] for s in "ABC"]), strict=True):
            codes[site].append(code)
    return FaultRun(
        root=root,
        data=data,
        server_codes=[server_code],
        server_log=_text(root / "server.log"),
        site_codes=codes,
        site_logs={s: _text(p) for s, p in logs.items()},
        events=events,
        notes={"broken-label": str(broken)},
    )


@_once
def server_restart_run(root: Path) -> FaultRun:
    """Run the "server restart" scenario in ``root`` (once per pytest run)."""
    data = make_demo_data(root / "data", 2)
    folders = {s: data / f"site-{s}" for s in "AB"}
    federation, configs = write_configs(
        root, data, allowed=["A", "B"], sites=folders, app=_app_config(data, 3)
    )
    logs = {s: root / f"client-{s}.log" for s in "AB"}
    server_args = [str(BIN / "fedmed-server"), "--config", str(federation)]
    events: dict[str, float] = {"start": time.monotonic()}
    codes: list[int | None] = []
    with _procs() as procs:
        server = procs.start(server_args, root / "server.log")
        clients = {s: procs.start(_client(root, s, configs[s]), logs[s]) for s in "AB"}
        wait_until(lambda: 1 in _ok_rounds(root / "out"), timeout=WAIT, what="round 1 done")
        # round 2 is in flight once both sites got its message
        wait_until(
            lambda: all("round 2: training" in _text(logs[s]) for s in "AB"),
            timeout=WAIT,
            what="round 2 at both sites",
        )
        events["server-killed"] = time.monotonic()
        killed = procs.kill_tree(server)
        codes.append(server.returncode)
        (root / "killed-pids.json").write_text(json.dumps(killed))
        with (root / "server.log").open("a") as fh:
            fh.write("\n===== FEDMED-E2E restart of fedmed-server =====\n")
        server = procs.start(server_args, root / "server.log")
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=2 * WAIT)
        events["server-exited"] = time.monotonic()
        procs.remember()
        codes.append(procs.stop(server))
        stopped = procs.stop_all([clients[s] for s in "AB"])
        site_codes = {s: [code] for s, code in zip("AB", stopped, strict=True)}
    return FaultRun(
        root=root,
        data=data,
        server_codes=codes,
        server_log=_text(root / "server.log"),
        site_codes=site_codes,
        site_logs={s: _text(p) for s, p in logs.items()},
        events=events,
    )
