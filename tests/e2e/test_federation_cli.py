"""fedmed-server and two fedmed-client processes over TLS + site auth on 127.0.0.1.

Two variants: the minimal harness app (checks the deployment path alone) and fedmed's own app
on demo data (checks the whole federation: two rounds, checkpoints, metrics).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_harness import app_hash

from fedmed.security.encryption import EncryptionKey
from fedmed.security.pki import write_pki

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
E2E_DIR = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RUN_TIMEOUT = 540.0
CACHE_KEY = EncryptionKey.generate().to_text()  # site A's disk cache is sealed with it
MINIMAL_APP = {"server_module": "fedmed_e2e_app:server", "client_module": "fedmed_e2e_app:client"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(E2E_DIR), env.get("PYTHONPATH")) if p)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FEDMED_CACHE_KEY"] = CACHE_KEY
    return env


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            args, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return proc.returncode


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    subprocess.run(
        [str(BIN / "fedmed"), "demo-data", str(out), "--sites", "2", "--cases", "3",
         "--holdout", "1", "--shape", "48", "48", "16"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out


def _write_configs(root: Path, data: Path, app: str) -> tuple[Path, dict[str, Path]]:
    pki = write_pki(root / "certs", server_hosts=["127.0.0.1"], sites=["A", "B"])
    port = free_port()
    if app == "minimal":
        app_lines = (
            'server-app = "fedmed_e2e_app:server"\nclient-app = "fedmed_e2e_app:client"\n',
            'num-rounds = 2\nout-dir = "out"\n',
        )
    else:
        app_lines = (
            "",
            'num-rounds = 2\nmodel = "coplenet"\nmodel-features = "4,8,16,32,64"\n'
            'patch-size = "32,32"\nlocal-epochs = 1\nlocal-steps = 1\nbatch-size = 1\n'
            f'round-timeout = 300.0\ndata-dir = "{data / "holdout"}"\nout-dir = "out"\n'
            "local-baselines = true\n",
        )
    federation = root / "federation.toml"
    federation.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nstate-dir = "state"\n'
        f'certs-dir = "certs"\nmin-sites = 2\nwait-for-sites = 120.0\n'
        f"run-timeout = {RUN_TIMEOUT}\n{app_lines[0]}"
        f'[server.sites]\nA = "certs/siteA.pub"\nB = "certs/siteB.pub"\n[app]\n{app_lines[1]}'
    )
    sites = {}
    disk_cache = "cache-mode = 'disk'"
    for site in ("A", "B"):
        sites[site] = root / f"{site}.toml"
        sites[site].write_text(
            f'site = "{site}"\ndata-dir = "{data / f"site-{site}"}"\nstate-dir = "site-{site}"\n'
            f"check-data = {'false' if app == 'minimal' else 'true'}\n"
            # site A discloses summaries of its single validation case, B keeps the default 5;
            # A caches on disk (sealed with FEDMED_CACHE_KEY), B in memory
            f"{'disclosure-floor = 1' if site == 'A' else ''}\n"
            f"{disk_cache if site == 'A' else ''}\n"
            f'[connection]\nserver-address = "127.0.0.1:{port}"\nca-cert = "certs/ca.pem"\n'
            f'private-key = "{pki.site_private_keys[site]}"\nruntime-port = {free_port()}\n'
            "backoff-initial = 1.0\nbackoff-max = 4.0\nheartbeat-interval = 10.0\n"
        )
        if app == "minimal":  # sites pin the minimal app on top of the installed fedmed app
            text = sites[site].read_text()
            digest = app_hash(**MINIMAL_APP)  # as the fedmed-server process will build it
            sites[site].write_text(
                text.replace("[connection]", f'app-hash = ["{digest}"]\n[connection]')
            )
    return federation, sites


@pytest.fixture
def federation_run(request, tmp_path: Path) -> Iterator[tuple[int, str, Path]]:
    """Run the server and two sites; yield (server exit code, server output, run folder)."""
    app = request.param
    data = request.getfixturevalue("demo_data") if app == "fedmed" else tmp_path / "none"
    federation, sites = _write_configs(tmp_path, data, app)
    procs = [_start([str(BIN / "fedmed-server"), "--config", str(federation)],
                    tmp_path / "server.log")]  # fmt: skip
    try:
        for site, config in sites.items():
            args = [str(BIN / "fedmed-client"), "--site", site, "--config", str(config)]
            procs.append(_start(args, tmp_path / f"client-{site}.log"))
        with contextlib.suppress(subprocess.TimeoutExpired):
            procs[0].wait(timeout=RUN_TIMEOUT + 120)
    finally:
        codes = [_stop(proc) for proc in procs]
    yield codes[0], (tmp_path / "server.log").read_text(), tmp_path


@pytest.mark.parametrize("federation_run", ["minimal"], indirect=True)
def test_cli_federation_with_minimal_app_completes_two_rounds(federation_run) -> None:
    code, output, root = federation_run

    assert code == 0, output[-4000:]
    assert "finished:completed" in output
    result = json.loads((root / "out" / "result.json").read_text())
    assert [r["sites"] for r in result["rounds"]] == [["A", "B"], ["A", "B"]]
    for site in ("A", "B"):
        assert "SuperNode pid" in (root / f"client-{site}.log").read_text()


@pytest.mark.parametrize("federation_run", ["fedmed"], indirect=True)
def test_cli_federation_with_fedmed_app_on_demo_data(federation_run) -> None:
    code, output, root = federation_run

    assert code == 0, output[-4000:]
    assert "finished:completed" in output
    lines = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    completed = [line for line in lines if line.get("round", 0) >= 1 and line["status"] == "ok"]
    assert [line["round"] for line in completed][-2:] == [1, 2]
    assert set(completed[-1]["sites"]) == {"A", "B"}
    assert (root / "out" / "checkpoints").is_dir()
    # the end-of-run cross-site table: each site's split, the held-out set, local-only baselines
    table = json.loads((root / "out" / "cross_site.json").read_text())
    assert (table["sites"], table["missing"]) == (["A", "B"], [])
    entries = {(e["model"], e["data"], e["metric"]): e for e in table["entries"]}
    on_a = entries["global-final", "val:A", "dice"]
    assert on_a["n"] == 1 and 0.0 <= on_a["mean"] <= 1.0
    assert entries["global-final", "val:B", "dice"]["status"] == "too few cases"
    assert "mean" not in entries["global-final", "val:B", "dice"]
    assert entries["global-final", "holdout", "dice"]["n"] == 1
    assert ("local-only@A", "val:A", "dice") in entries
    assert ("finetuned@A", "val:A", "dice") in entries
    # signed by default: the server signed with its TLS key, each site checked it against the CA
    verify = subprocess.run(
        [str(BIN / "fedmed"), "verify", str(root / "out"), "--ca", str(root / "certs" / "ca.pem"),
         "--require-signatures"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    for site in ("A", "B"):
        audit = root / f"site-{site}" / "cache" / "audit.jsonl"
        trained = [json.loads(x) for x in audit.read_text().splitlines()]
        trained = [x for x in trained if x.get("event") == "train"]
        assert [x["round"] for x in trained][-2:] == [1, 2], trained
        assert {x["signature"] for x in trained} == {"verified"}
    # site A's disk cache holds its preprocessed cases, every one sealed
    entries = list((root / "site-A" / "cache" / "volumes").iterdir())
    assert len(entries) == 3 and all(p.name.endswith(".safetensors.enc") for p in entries)


def test_sigterm_stops_the_server_and_its_superlink(tmp_path: Path) -> None:
    federation, _ = _write_configs(tmp_path, tmp_path / "none", "minimal")
    log = tmp_path / "server.log"
    proc = _start([str(BIN / "fedmed-server"), "--config", str(federation)], log)
    try:
        deadline = time.monotonic() + 90
        while "site(s) online" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        superlink_pid = int(log.read_text().split("SuperLink pid ")[1].split()[0])

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        _stop(proc)

    assert code == 130, log.read_text()[-2000:]
    with pytest.raises(ProcessLookupError):
        os.kill(superlink_pid, 0)
