"""``fedmed-client --site A``: a hospital site (Flower SuperNode + the fedmed client app).

Reads ``configs/sites/A.toml``, refuses a disk cache that would hold patient images in the
clear (``cache-mode = "disk"`` without ``FEDMED_CACHE_KEY`` or ``plaintext-cache = true``;
exit 3), checks its hardware keys against this machine (exit 3 naming
the key, e.g. a ``device`` it lacks) and the site's data folder (exit 4 with the report when
it is bad), then runs the site's SuperNode, restarting it with backoff when it exits.
Ctrl-C or SIGTERM stops it.

Example::

    fedmed-client --site A                      # reads configs/sites/A.toml
    fedmed-client --site A --config /etc/fedmed/site.toml
    fedmed-client --print-app-hash              # sha256 of the app this fedmed accepts

The site runs only apps whose sha256 it pinned: the one its installed fedmed builds plus the
config's ``app-hash`` list (:mod:`fedmed.flower.pinning`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from fedmed.cli.runner import add_version, configure_logging, run_command
from fedmed.errors import DataError
from fedmed.flower.version import check_flower_version
from fedmed.site_config import SiteConfig, load_site_config

__all__ = ["check_cache", "check_data", "check_hardware", "main", "run_site"]

log = logging.getLogger("fedmed.client")
_MAX_LISTED = 30


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def check_data(config: SiteConfig) -> None:
    """Check the site's data folder before joining.

    Raises:
        DataError: the folder has problems; the message lists them.
    """
    from fedmed.io.check import check_site_folder  # numpy/nibabel: only when checking

    problems = check_site_folder(
        config.data_dir,
        affine_atol=config.label_affine_tolerance,
        max_image_bytes=int(config.max_image_gib * 2**30),
        allow_external_links=config.allow_external_links,
    )
    if problems:
        listed = "\n  ".join(str(p) for p in problems[:_MAX_LISTED])
        more = (
            f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        )
        raise DataError(
            f"site {config.site}: data folder {config.data_dir} has {len(problems)} problem(s); "
            f"fix them (or run `fedmed data check {config.data_dir}`) before joining:\n  "
            f"{listed}{more}"
        )
    log.info("site %s: data folder %s passed the check", config.site, config.data_dir)


def check_cache(config: SiteConfig) -> None:
    """Refuse a disk cache that would hold the site's patient images in the clear: ConfigError
    naming the file, ``FEDMED_CACHE_KEY`` and ``plaintext-cache``, before joining."""
    from fedmed.security.encryption import check_cache_at_rest

    key = check_cache_at_rest(
        config.cache_mode,
        plaintext_cache=config.plaintext_cache,
        source=f"site config {config.path}",
    )
    if key is not None:
        log.info("site %s: disk cache encrypted (key %s)", config.site, key.fingerprint)
    elif config.cache_mode == "disk":
        log.warning(
            "site %s: disk cache %s holds patient images in the clear (plaintext-cache = true)",
            config.site,
            config.cache_dir,
        )


def check_hardware(config: SiteConfig) -> None:
    """Check the site's hardware keys against this machine (a device it lacks, an AMP mode
    its devices cannot run): ConfigError naming the file and the key, before joining."""
    from fedmed.hardware import HardwareSettings  # torch: only when starting the site

    hardware = HardwareSettings.from_node_config(
        config.node_config(), source=f"site config {config.path}"
    )
    log.info("site %s: hardware %s", config.site, hardware.describe())


def run_site(config: SiteConfig) -> int:
    """Check the cache, the hardware and the data, then run the site's SuperNode until
    interrupted."""
    from fedmed.client.supernode import SiteNode

    check_cache(config)
    check_hardware(config)
    if config.check_data:
        check_data(config)
    node = SiteNode(config, echo=sys.stderr)
    try:
        return node.run()
    finally:
        node.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run the site."""
    parser = argparse.ArgumentParser(
        prog="fedmed-client",
        description="a hospital site: checks its data, then runs a Flower SuperNode",
    )
    add_version(parser)
    parser.add_argument("--site", help="site name, e.g. A (required unless --print-app-hash)")
    parser.add_argument(
        "--print-app-hash",
        action="store_true",
        help="print the sha256 of the fedmed app this installation accepts, then exit",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="site config (default configs/sites/SITE.toml)"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no site key (local tests only; the server must run --insecure too)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.print_app_hash:
        from fedmed.client.supernode import installed_app_hash

        print(installed_app_hash())
        return 0
    if not args.site:
        parser.error("--site is required")
    configure_logging(args.verbose)
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)

    def run() -> int:
        check_flower_version()
        path = args.config or Path("configs/sites") / f"{args.site}.toml"
        config = load_site_config(path, site=args.site)
        if args.insecure:
            config = dataclasses.replace(config, insecure=True, ca_cert=None, private_key=None)
        if config.insecure:
            print(
                "fedmed-client: WARNING: insecure: no TLS and no site authentication; the "
                "weights travel in clear. Never use this outside a local test.",
                file=sys.stderr,
            )
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return run_site(config)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return run_command(run, prog="fedmed-client")
