"""``fedmed certs``: the coordinator's side of the federation's PKI.

Two forms (:mod:`fedmed.security.pki` has the layout)::

    fedmed certs CERTS --server-address HOST[,HOST] [--ca-dir DIR]   # once: CA + server cert
    fedmed certs CERTS --add-site C --public-key siteC.pub             # per site, any time

The first writes the CA into its own folder (``CERTS-ca`` by default, never inside CERTS) and
the server's certificate into CERTS, the server's ``certs-dir``. The second registers a site's
public key, made at the site by ``fedmed site-key``, into CERTS without touching the CA. No
``fedmed`` command makes a site's private key on the coordinator.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedmed.errors import ConfigError
from fedmed.security.pki import init_pki, register_site
from fedmed.security.site_keys import load_ec_public_key, public_key_fingerprint

__all__ = ["register"]


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def register(subparsers: Any) -> None:
    """Add the ``certs`` subcommand."""
    parser = subparsers.add_parser(
        "certs",
        help="coordinator: write the CA and the server's certificate, or register a site's "
        "public key",
        description=(
            "With --server-address: write ca.pem, server.pem/server.key (SANs: the given hosts "
            "plus localhost, 127.0.0.1, ::1) into CERTS (the server's certs-dir) and the CA's "
            "key into --ca-dir (default CERTS-ca; keep it offline). With --add-site NAME "
            "--public-key FILE: register the public key a site made with `fedmed site-key`."
        ),
    )
    parser.add_argument("out", type=Path, metavar="CERTS", help="the server's certs folder")
    parser.add_argument(
        "--server-address",
        type=_split,
        metavar="HOST[,HOST]",
        help="set up the federation: host names or IP addresses the sites use (no port)",
    )
    parser.add_argument(
        "--ca-dir",
        type=Path,
        metavar="DIR",
        help="where the CA's private key goes (default: CERTS-ca next to CERTS); never CERTS",
    )
    parser.add_argument("--add-site", metavar="NAME", help="register site NAME's public key")
    parser.add_argument(
        "--public-key", type=Path, metavar="FILE", help="with --add-site: the site's siteX.pub"
    )
    parser.add_argument("--sites", help=argparse.SUPPRESS)  # the old form: explained below
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace existing certificates and keys (a new CA: every site needs the new "
        "ca.pem), or a registered site's key",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.sites is not None:
        raise ConfigError(
            "fedmed certs no longer makes site keys (a site's private key must never exist at "
            "the coordinator): each site runs `fedmed site-key DIR --site NAME` and sends you "
            f"siteNAME.pub; register it with `fedmed certs {args.out} --add-site NAME "
            "--public-key siteNAME.pub`"
        )
    if (args.server_address is None) == (args.add_site is None):
        raise ConfigError(
            "give either --server-address HOST (set up the CA and server certificate) or "
            "--add-site NAME --public-key FILE (register a site)"
        )
    if args.add_site is not None:
        return _add_site(args)
    if args.public_key is not None:
        raise ConfigError("--public-key goes with --add-site NAME")
    manifest = init_pki(
        args.out, server_hosts=args.server_address, ca_dir=args.ca_dir, force=args.force
    )
    print(f"CA certificate:     {manifest.ca_cert}  (give to every site)")
    print(
        f"CA private key:     {manifest.ca_key}  (keep it offline, away from the server; needed "
        "only to issue a new server certificate)"
    )
    print(f"server certificate: {manifest.server_cert}  SANs: {', '.join(manifest.server_hosts)}")
    print(f"server key:         {manifest.server_key}  (the server's TLS and signing key)")
    print(f"manifest:           {manifest.manifest}")
    print(
        "next: each site runs `fedmed site-key DIR --site NAME` and sends you siteNAME.pub; "
        f"register it with `fedmed certs {args.out} --add-site NAME --public-key siteNAME.pub`"
    )
    return 0


def _add_site(args: argparse.Namespace) -> int:
    if args.public_key is None:
        raise ConfigError(f"--add-site {args.add_site} needs --public-key FILE (the site's .pub)")
    if args.ca_dir is not None:
        raise ConfigError("--ca-dir goes with --server-address: registering a site needs no CA")
    path = register_site(args.out, args.add_site, args.public_key, force=args.force)
    fingerprint = public_key_fingerprint(load_ec_public_key(path))
    print(f"site {args.add_site}: registered {path}  ({fingerprint})")
    print(
        "compare that fingerprint with the one `fedmed site-key` printed at the site; then add "
        f'{args.add_site} = "{path}" to [server.sites] in the federation config and restart '
        "fedmed-server"
    )
    return 0
