"""The deployment machinery end to end: SuperLink with TLS + site auth, key registration,
refusal of an unknown site, and a two-round run of a minimal app over real SuperNodes.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedmed.client.supernode import SiteNode
from fedmed.server.submit import (
    build_fab,
    online_sites,
    register_sites,
    run_status,
    stop_unfinished_runs,
    submit_run,
    wait_for_run,
    wait_for_sites,
)
from fedmed.server.superlink import SuperLink

from fedmed.errors import FederationError
from fedmed.flower.control import control_client

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MINIMAL_APP = {"server_module": "fedmed_e2e_app:server", "client_module": "fedmed_e2e_app:client"}


@pytest.fixture(scope="module")
def link(pki, tmp_path_factory, e2e_pythonpath, make_server_config) -> Iterator[SuperLink]:
    superlink = SuperLink(make_server_config(pki, tmp_path_factory.mktemp("server")))
    superlink.start()
    try:
        yield superlink
    finally:
        superlink.stop()


@pytest.fixture(scope="module")
def client(link, pki):
    with control_client(link.address, ca_cert=pki.ca_cert) as control:
        yield control


def _run_in_thread(node: SiteNode) -> threading.Thread:
    thread = threading.Thread(target=node.run, daemon=True, name=f"site-{node.config.site}")
    thread.start()
    return thread


def test_registration_is_idempotent(client, link) -> None:
    first = register_sites(client, link.config.sites)
    second = register_sites(client, link.config.sites)

    assert all(isinstance(node_id, int) and node_id > 0 for node_id in first.values())
    assert set(first) == {"A", "B"}
    assert second == {"A": None, "B": None}


def test_unregistered_site_key_is_refused(
    client, link, pki, tmp_path: Path, make_site_config
) -> None:
    register_sites(client, link.config.sites)
    node = SiteNode(make_site_config(pki, "X", link.fleet_address, tmp_path, max_restarts=0))

    with pytest.raises(FederationError, match=r"Flower exit code 305.*code 2004"):
        node.run()

    assert "site-X" not in online_sites(client)


def test_two_sites_complete_two_rounds(client, link, pki, tmp_path: Path, make_site_config) -> None:
    # Prepare
    register_sites(client, link.config.sites)
    nodes = [
        SiteNode(make_site_config(pki, site, link.fleet_address, tmp_path / site))
        for site in ("A", "B")
    ]
    threads = [_run_in_thread(node) for node in nodes]
    logs = io.StringIO()
    try:
        wait_for_sites(client, min_sites=2, timeout=90)
        fab = build_fab(**MINIMAL_APP)

        # Execute
        start = time.monotonic()
        run_id = submit_run(
            client,
            fab,
            run_config={"num-rounds": 2, "min-sites": 2, "out-dir": str(tmp_path / "out")},
        )
        outcome = wait_for_run(client, run_id, timeout=180, log_sink=logs.write)
        seconds = time.monotonic() - start
    finally:
        for node in nodes:
            node.stop()
        for thread in threads:
            thread.join(timeout=60)

    # Assert
    assert outcome.ok, (outcome, logs.getvalue()[-3000:])
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["rounds"] == [
        {"round": 1, "sites": ["A", "B"], "w": 1.0},
        {"round": 2, "sites": ["A", "B"], "w": 2.0},
    ]
    assert "e2e round 2" in logs.getvalue()
    assert all(node.proc is not None and node.proc.poll() is not None for node in nodes)
    print(f"two rounds of the minimal app over TLS + auth: {seconds:.1f} s")


def test_restart_with_same_state_dir_keeps_registrations_and_stops_stale_runs(
    pki, tmp_path: Path, make_server_config, e2e_pythonpath
) -> None:
    # Prepare: a second SuperLink with its own database and a run left waiting for sites
    config = make_server_config(pki, tmp_path / "state")
    fab = build_fab(**MINIMAL_APP)
    run_config = {"num-rounds": 1, "min-sites": 2, "out-dir": str(tmp_path / "out")}
    with SuperLink(config) as first, control_client(first.address, ca_cert=pki.ca_cert) as c:
        registered = register_sites(c, config.sites)
        stale_run = submit_run(c, fab, run_config=run_config)
    assert all(registered.values())
    assert (tmp_path / "state" / "superlink.db").is_file()

    # Execute: the same config again (same database)
    with SuperLink(config) as second, control_client(second.address, ca_cert=pki.ca_cert) as c:
        again = register_sites(c, config.sites)
        stopped = stop_unfinished_runs(c)
        status, _ = run_status(c, stale_run)

    # Assert
    assert again == {"A": None, "B": None}
    assert stopped == [stale_run]
    assert status.startswith("finished")
    assert not second.alive()


def test_site_trains_after_superlink_restart(
    pki, tmp_path: Path, make_server_config, make_site_config, e2e_pythonpath
) -> None:
    # Prepare: a SuperLink and site A online
    config = make_server_config(pki, tmp_path / "state", min_sites=1)
    node = SiteNode(make_site_config(pki, "A", config.fleet_address, tmp_path / "A"))
    first = SuperLink(config)
    first.start()
    thread = None
    try:
        with control_client(first.address, ca_cert=pki.ca_cert) as c:
            register_sites(c, config.sites)
            thread = _run_in_thread(node)
            wait_for_sites(c, min_sites=1, timeout=90)

        # Execute: the server goes away and comes back on the same database and port
        first.stop()
        second = SuperLink(config)
        second.start()
        try:
            with control_client(second.address, ca_cert=pki.ca_cert) as c:
                run_config = {"num-rounds": 1, "min-sites": 1, "out-dir": str(tmp_path / "out")}
                run_id = submit_run(c, build_fab(**MINIMAL_APP), run_config=run_config)
                outcome = wait_for_run(c, run_id, timeout=180)
        finally:
            second.stop()
    finally:
        first.stop()
        node.stop()
        if thread is not None:
            thread.join(timeout=60)

    # Assert: the site took part in a round of the restarted server
    assert outcome.ok, outcome
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["rounds"] == [{"round": 1, "sites": ["A"], "w": 1.0}]
    print(f"site A restarts after the SuperLink restart: {node.restarts}")


def test_waiting_for_sites_is_bounded(client, link) -> None:
    start = time.monotonic()
    with pytest.raises(
        FederationError, match=r"only \d of min-sites = 3 site\(s\) joined within 2 s"
    ):
        wait_for_sites(client, min_sites=3, timeout=2.0, poll=0.5)
    assert time.monotonic() - start < 10


def test_a_failing_server_app_ends_the_run_as_failed(client, tmp_path: Path) -> None:
    # The minimal server app cannot create its out-dir under a regular file: it raises.
    (tmp_path / "file").write_text("")
    run_config = {"num-rounds": 0, "min-sites": 0, "out-dir": str(tmp_path / "file" / "out")}
    run_id = submit_run(client, build_fab(**MINIMAL_APP), run_config=run_config)
    outcome = wait_for_run(client, run_id, timeout=120)

    assert not outcome.ok
    assert outcome.status == "finished:failed"
