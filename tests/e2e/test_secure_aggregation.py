"""SecAgg+ over real processes: fedmed-server and three fedmed-client sites, TLS + site auth.

The same one-round federation runs twice on the same data and seeds, once plain and once with
``secure-aggregation = true``. Local training is deterministic on CPU, so the two global models
after round 1 differ only by SecAgg+'s quantization, which
:func:`fedmed.security.secagg.quantization_tolerance` bounds. The secure run's server never
held a site's update: its audit log records one received aggregate per round.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fault_harness import Procs, free_port, make_demo_data
from safetensors.numpy import load_file

from fedmed.security.pki import write_pki
from fedmed.security.secagg import quantization_tolerance

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
SITES = ("A", "B", "C")
RUN_TIMEOUT = 600.0


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("demo") / "data", sites=len(SITES))


def _write_configs(root: Path, data: Path, *, secure: bool) -> tuple[Path, dict[str, Path]]:
    pki = write_pki(root / "certs", server_hosts=["127.0.0.1"], sites=list(SITES))
    port = free_port()
    sites_table = "".join(f'{s} = "certs/site{s}.pub"\n' for s in SITES)
    federation = root / "federation.toml"
    federation.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nstate-dir = "state"\n'
        f'certs-dir = "certs"\nmin-sites = 3\nwait-for-sites = 150.0\n'
        f"run-timeout = {RUN_TIMEOUT}\n[server.sites]\n{sites_table}[app]\n"
        'num-rounds = 1\nmodel = "coplenet"\nmodel-features = "4,8,16,32,64"\n'
        'patch-size = "32,32"\nlocal-epochs = 1\nlocal-steps = 2\nbatch-size = 2\n'
        f'round-timeout = 300.0\nout-dir = "out"\nsecure-aggregation = {str(secure).lower()}\n'
    )
    sites = {}
    for site in SITES:
        sites[site] = root / f"{site}.toml"
        sites[site].write_text(
            f'site = "{site}"\ndata-dir = "{data / f"site-{site}"}"\nstate-dir = "site-{site}"\n'
            f'device = "cpu"\n[connection]\nserver-address = "127.0.0.1:{port}"\n'
            f'ca-cert = "certs/ca.pem"\nprivate-key = "{pki.site_private_keys[site]}"\n'
            f"runtime-port = {free_port()}\nbackoff-initial = 1.0\nbackoff-max = 4.0\n"
        )
    return federation, sites


def _run_federation(root: Path, data: Path, *, secure: bool) -> tuple[int | None, str]:
    root.mkdir(parents=True)
    federation, sites = _write_configs(root, data, secure=secure)
    server_log = root / "server.log"
    procs = Procs({**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    try:
        server = procs.start([str(BIN / "fedmed-server"), "--config", str(federation)], server_log)
        clients = [
            procs.start(
                [str(BIN / "fedmed-client"), "--site", site, "--config", str(config)],
                root / f"client-{site}.log",
            )
            for site, config in sites.items()
        ]
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=RUN_TIMEOUT + 120)
        code = procs.stop(server)
        procs.stop_all(clients)
    finally:
        procs.close()
    return code, server_log.read_text()


@pytest.fixture(scope="module")
def runs(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("secagg")
    out = {}
    for mode in ("plain", "secure"):
        code, output = _run_federation(base / mode, demo_data, secure=mode == "secure")
        assert code == 0, f"{mode} run failed:\n{output[-4000:]}"
        out[mode] = base / mode / "out"
    return out


def _weights(out: Path, server_round: int) -> dict[str, np.ndarray]:
    return load_file(str(out / "checkpoints" / f"round-{server_round:04d}" / "weights.safetensors"))


def _round_record(out: Path, server_round: int) -> dict:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in lines if r["round"] == server_round and r.get("status") == "ok")


def test_secure_aggregate_equals_plain_fedavg_within_quantization(runs: dict[str, Path]) -> None:
    initial = _weights(runs["plain"], 0)
    plain, secure = _weights(runs["plain"], 1), _weights(runs["secure"], 1)
    record = _round_record(runs["secure"], 1)
    examples = [record["sites"][s]["num-examples"] for s in SITES]
    tolerance = quantization_tolerance(examples)

    secure_initial = _weights(runs["secure"], 0)
    assert all(np.array_equal(secure_initial[k], v) for k, v in initial.items())
    moved = max(float(np.max(np.abs(plain[k].astype(np.float64) - initial[k]))) for k in plain)
    assert moved > 100 * tolerance, "training must move the model well past the tolerance"
    for key, value in plain.items():
        diff = np.abs(secure[key].astype(np.float64) - value.astype(np.float64))
        float_eps = 4 * np.finfo(np.float32).eps * np.maximum(np.abs(value), 1.0)
        assert np.all(diff <= tolerance + float_eps), (key, float(diff.max()), tolerance)


def test_secure_server_holds_only_the_aggregate(runs: dict[str, Path]) -> None:
    for mode, expected in (("plain", set(SITES)), ("secure", {"secure-aggregate"})):
        audit = [json.loads(x) for x in (runs[mode] / "audit.jsonl").read_text().splitlines()]
        (round_line,) = [x for x in audit if x["event"] == "round"]
        assert set(round_line["received_sha256"]) == expected, mode
    record = _round_record(runs["secure"], 1)
    assert set(record["sites"]) == set(SITES)
    assert all(np.isfinite(m["train-loss"]) for m in record["sites"].values())
    assert record["secure-aggregation"] is True
