"""Real Flower processes on 127.0.0.1 with TLS and site authentication, on free ports.

Every process started here is stopped by pid (process group) in the fixture teardown.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedmed.config import ServerConfig
from fedmed.security.pki import PkiManifest, write_pki
from fedmed.site_config import SiteConfig

E2E_DIR = Path(__file__).resolve().parent
# Sites heartbeat every 10 s (Flower's shortest, its default 30 s): a site that went away, or
# that reconnects to a restarted SuperLink, is done with after 20 s instead of 60 s.
HEARTBEAT_S = 10.0
# The minimal app's shim (``build_fab(**MINIMAL_APP)``); sites here pin it next to fedmed's.
MINIMAL_APP = {"server_module": "fedmed_e2e_app:server", "client_module": "fedmed_e2e_app:client"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n N``), end-to-end tests (the longest, mostly waiting) go first:
    started last, one of them alone would keep the run going minutes after the rest ended.
    Each worker sorts alike (a stable sort), so all see the same order."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


def minimal_app_hash() -> str:
    """sha256 of the minimal app's shim FAB."""
    from fedmed.server.submit import build_fab

    return build_fab(**MINIMAL_APP).hash_str


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiManifest:
    """CA, server certificate for 127.0.0.1 and keys for sites A, B and an unregistered X."""
    return write_pki(
        tmp_path_factory.mktemp("certs"), server_hosts=["127.0.0.1"], sites=["A", "B", "X"]
    )


@pytest.fixture(scope="module")
def e2e_pythonpath() -> Iterator[None]:
    """Child processes (server app, client app) import the minimal app from tests/e2e."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(E2E_DIR), old) if p)
    yield
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def _server_config(pki: PkiManifest, state_dir: Path, *, min_sites: int = 2) -> ServerConfig:
    """A TLS + site-auth SuperLink on a free port allowing sites A and B."""
    return ServerConfig(
        host="127.0.0.1",
        port=free_port(),
        state_dir=state_dir,
        ca_cert=pki.ca_cert,
        server_cert=pki.server_cert,
        server_key=pki.server_key,
        insecure=False,
        min_sites=min_sites,
        sites={site: pki.site_public_keys[site] for site in ("A", "B")},
        wait_for_sites_s=90.0,
        run_timeout_s=240.0,
        startup_timeout_s=60.0,
        stream_logs=True,
    )


def _site_config(
    pki: PkiManifest, site: str, address: str, state_dir: Path, *, max_restarts: int = 3
) -> SiteConfig:
    """Site ``site`` connecting to ``address`` with its own key, state and runtime port.

    It pins the minimal app (and, as every site, the installed fedmed app).
    """
    return SiteConfig(
        path=state_dir / f"{site}.toml",
        site=site,
        data_dir=state_dir / "data",
        cache_dir=state_dir / "cache",
        cache_mode="memory",
        device="cpu",
        seed=0,
        server_address=address,
        ca_cert=pki.ca_cert,
        private_key=pki.site_private_keys[site],
        insecure=False,
        state_dir=state_dir,
        runtime_port=free_port(),
        max_restarts=max_restarts,
        backoff_initial_s=1.0,
        backoff_max_s=2.0,
        check_data=False,
        app_hashes=(minimal_app_hash(),),
        heartbeat_interval_s=HEARTBEAT_S,
    )


@pytest.fixture(scope="session")
def make_server_config() -> Callable[..., ServerConfig]:
    """``make_server_config(pki, state_dir, *, min_sites=2)``."""
    return _server_config


@pytest.fixture(scope="session")
def make_site_config() -> Callable[..., SiteConfig]:
    """``make_site_config(pki, site, address, state_dir, *, max_restarts=3)``."""
    return _site_config
