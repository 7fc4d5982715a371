"""SiteNode's watchdog and heartbeat setting: a SuperNode that stopped working is restarted with
the backoff; ``[connection] heartbeat-interval`` is validated and reaches the SuperLink.

Real SuperNode processes against ``fake_superlink.py`` (a Fleet API that answers HTTP 500 on
demand; Flower's own SuperLink cannot be made to)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_superlink import FakeSuperLink
from fedmed.client.supernode import SiteNode

from fedmed.errors import ConfigError, FederationError
from fedmed.site_config import load_site_config


def _write_site(tmp_path: Path, address: str, extra: str = "") -> Path:
    path = tmp_path / "A.toml"
    path.write_text(
        f'site = "A"\ndata-dir = "data"\nstate-dir = "state"\nwarm-start = false\n'
        f'[connection]\nserver-address = "{address}"\ninsecure = true\nmax-restarts = 1\n'
        f"backoff-initial = 1.0\nbackoff-max = 2.0\n{extra}"
    )
    return path


def test_heartbeat_interval_defaults_to_flowers_30_s(tmp_path: Path) -> None:
    assert load_site_config(_write_site(tmp_path, "127.0.0.1:9")).heartbeat_interval_s == 30.0


def test_heartbeat_interval_is_read(tmp_path: Path) -> None:
    path = _write_site(tmp_path, "127.0.0.1:9", "heartbeat-interval = 10\n")
    assert load_site_config(path).heartbeat_interval_s == 10.0


@pytest.mark.parametrize("value", ["5.0", "3600", "-1"])
def test_heartbeat_interval_outside_flowers_bounds_is_a_config_error(
    tmp_path: Path, value: str
) -> None:
    path = _write_site(tmp_path, "127.0.0.1:9", f"heartbeat-interval = {value}\n")
    with pytest.raises(ConfigError, match=rf"A.toml.*heartbeat-interval = {value}"):
        load_site_config(path)


@pytest.mark.slow
def test_a_supernode_whose_pull_loop_died_is_restarted_with_the_backoff(
    fake_superlink: FakeSuperLink, tmp_path: Path
) -> None:
    # Prepare: every pull is answered 500 (Flower's SuperNode would then idle forever)
    fake_superlink.fail.add("pull-messages")
    path = _write_site(tmp_path, fake_superlink.address, "heartbeat-interval = 15.0\n")
    waits: list[float] = []
    node = SiteNode(load_site_config(path), sleep=waits.append)

    # Execute
    reason = r"exited with code 75 \(stopped working: Flower's pull loop ended .*2 times in a row"
    with pytest.raises(FederationError, match=reason):
        node.run()

    # Assert: started, stopped working, restarted once after the backoff, gave up (max 1)
    assert waits == [1.0]
    assert node.restarts == 1
    activations = fake_superlink.got("activate-node")
    assert [a.heartbeat_interval for a in activations] == [15.0, 15.0]
    assert len(fake_superlink.got("deactivate-node")) == 2  # each left the SuperLink cleanly
    assert node.proc is not None and node.proc.poll() == 75
