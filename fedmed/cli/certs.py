"""``fedmed certs OUT --server-address HOST[,HOST] --sites A,B,C``: the federation's PKI."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedmed.security.pki import write_pki

__all__ = ["register"]


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def register(subparsers: Any) -> None:
    """Add the ``certs`` subcommand."""
    parser = subparsers.add_parser(
        "certs",
        help="write a CA, the server's TLS certificate and one key pair per site",
        description=(
            "Write ca.pem, server.pem/server.key (SANs: the given hosts plus localhost, "
            "127.0.0.1, ::1) and siteX.key/siteX.pub (EC P-384, OpenSSH) per site, plus "
            "sites.json. Give each site ca.pem and its own siteX.key; keep ca.key offline."
        ),
    )
    parser.add_argument("out", type=Path, help="folder to write into (created if missing)")
    parser.add_argument(
        "--server-address",
        required=True,
        type=_split,
        metavar="HOST[,HOST]",
        help="host names or IP addresses the sites use to reach the server (no port)",
    )
    parser.add_argument("--sites", required=True, type=_split, metavar="A,B,C", help="site names")
    parser.add_argument(
        "--force", action="store_true", help="replace existing certificates and keys"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    manifest = write_pki(
        args.out, server_hosts=args.server_address, sites=args.sites, force=args.force
    )
    print(f"CA certificate:     {manifest.ca_cert}  (give to every site)")
    print(f"server certificate: {manifest.server_cert}  SANs: {', '.join(manifest.server_hosts)}")
    for site, key in manifest.site_private_keys.items():
        print(
            f"site {site}: private {key} (only to site {site}), public "
            f"{manifest.site_public_keys[site]}"
        )
    print(f"manifest:           {manifest.manifest}")
    return 0
