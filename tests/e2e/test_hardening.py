"""Hardening over real processes on 127.0.0.1 (TLS + site auth), one federation for all checks.

* The public socket serves only the Fleet API: run submission, key registration, the Runtime
  API, the docs and path tricks get 404 there while the sites train over it.
* Sites run only pinned apps: a shim with one changed line is refused by both sites, the server
  app gets error replies (not silence) and the run does not hang.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from fedmed.client.supernode import SiteNode
from fedmed.server.submit import (
    build_fab,
    fab_files,
    register_sites,
    submit_run,
    wait_for_run,
    wait_for_sites,
)
from fedmed.server.superlink import SuperLink

from fedmed.errors import FederationError, SecurityError
from fedmed.flower.control import control_client
from fedmed.flower.fab import fab_from_files

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MINIMAL = {"server_module": "fedmed_e2e_app:server", "client_module": "fedmed_e2e_app:client"}


class Federation:
    """A SuperLink (gateway) and sites A and B connected to its public address."""

    def __init__(self, link: SuperLink, nodes: list[SiteNode], ca: Path) -> None:
        self.link, self.nodes, self.ca = link, nodes, ca

    def run(self, fab, out: Path, *, timeout: float = 150) -> tuple[object, dict, float]:
        start = time.monotonic()
        with control_client(self.link.address, ca_cert=self.ca) as client:
            run_id = submit_run(
                client, fab, run_config={"num-rounds": 1, "min-sites": 2, "out-dir": str(out)}
            )
            outcome = wait_for_run(client, run_id, timeout=timeout, poll=0.5)
        result = json.loads((out / "result.json").read_text()) if outcome.ok else {}
        return outcome, result, time.monotonic() - start


@pytest.fixture(scope="module")
def federation(
    pki, tmp_path_factory, e2e_pythonpath, make_server_config, make_site_config
) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("hardening")
    link = SuperLink(make_server_config(pki, root / "server"))
    pinned = build_fab(**MINIMAL).hash_str
    nodes = [
        SiteNode(
            replace(
                make_site_config(pki, site, link.fleet_address, root / site),
                app_hashes=(pinned,),
            )
        )
        for site in ("A", "B")
    ]
    threads: list[threading.Thread] = []
    link.start()
    try:
        with control_client(link.address, ca_cert=pki.ca_cert) as client:
            register_sites(client, link.config.sites)
            for node in nodes:
                threads.append(threading.Thread(target=node.run, daemon=True))
                threads[-1].start()
            wait_for_sites(client, min_sites=2, timeout=90, alive=link.alive)
        yield Federation(link, nodes, pki.ca_cert)
    finally:
        for node in nodes:
            node.stop()
        for thread in threads:
            thread.join(timeout=30)
        link.stop()


def _raw_request(address: str, ca: Path, request_line: str) -> int:
    """Send one HTTP/1.1 request line verbatim (no client-side path normalisation)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(
            f"{request_line} HTTP/1.1\r\nHost: {address}\r\nContent-Type: "
            "application/protobuf\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        status = tls.recv(64).decode().split()[1]
    return int(status)


PROBES = [
    "POST /v1/control/start-run",
    "POST /v1/control/register-node",
    "POST /v1/control/list-runs",
    "POST /v1/runtime/pull-messages",
    "GET /docs",
    "GET /openapi.json",
    "POST /v1/fleet/../control/start-run",
    "POST /v1/fleet/%2e%2e/control/start-run",
    "POST /v1/fleet/%2E%2E/control/list-runs",
    "POST //v1/control/start-run",
    "POST /v1/fleet/get-run/",
    "GET /v1/fleet/get-run",
]


def test_public_port_refuses_everything_but_the_fleet_api(federation, tmp_path: Path) -> None:
    public, private, ca = federation.link.fleet_address, federation.link.address, federation.ca

    statuses = {probe: _raw_request(public, ca, probe) for probe in PROBES}
    with control_client(public, ca_cert=ca) as client:
        with pytest.raises(FederationError, match="HTTP 404"):
            submit_run(client, build_fab(**MINIMAL))
        with pytest.raises(SecurityError, match="HTTP 404"):
            register_sites(client, {"X": Path(federation.link.config.sites["A"])})

    assert statuses == dict.fromkeys(PROBES, 404)
    # The same Control API answers on the private port, and /health on both.
    assert _raw_request(private, ca, "POST /v1/control/list-runs") != 404
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as http:
        assert http.get(f"https://{public}/health").status_code == 200
    assert "public port: refused" in federation.link.log_file.read_text()


def test_sites_train_over_the_public_port(federation, tmp_path: Path) -> None:
    outcome, result, seconds = federation.run(build_fab(**MINIMAL), tmp_path / "out")

    assert outcome.ok, outcome
    assert result["rounds"] == [{"round": 1, "sites": ["A", "B"], "w": 1.0}]
    print(f"one round of the pinned minimal app over the public port: {seconds:.1f} s")


def test_a_tampered_app_is_refused_by_both_sites_without_a_hang(federation, tmp_path: Path) -> None:
    # Prepare: the pinned shim with one changed line
    files = fab_files(**MINIMAL)
    files["fedmed_app/client_app.py"] += b"print('tampered')\n"
    tampered = fab_from_files(files)
    sizes = {n.config.site: n.log_file.stat().st_size for n in federation.nodes}

    # Execute
    # (the minimal app waits 60 s for replies; a hang would overrun the 120 s bound and fail)
    outcome, result, seconds = federation.run(tampered, tmp_path / "out", timeout=120)

    # Assert: the run ends (minimal app: errors are not replies), no site trained
    assert outcome.ok, outcome
    assert result["rounds"] == [{"round": 1, "sites": [], "w": 0.0}]
    for node in federation.nodes:
        with node.log_file.open("rb") as fh:
            fh.seek(sizes[node.config.site])
            text = fh.read().decode(errors="replace")
        assert f"site refuses app sha256 {tampered.hash_str}" in text, text[-2000:]
        assert "tampered" not in text.replace("tampered app", "")
    print(f"tampered app refused by both sites in {seconds:.1f} s")
