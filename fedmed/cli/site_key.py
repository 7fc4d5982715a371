"""``fedmed site-key DIR --site A``: a site makes its own key pair; only the public key leaves.

Writes ``DIR/siteA.key`` (mode 0600; ``[connection] private-key`` in the site's config) and
``DIR/siteA.pub``, and prints the public key's fingerprint. The site sends ``siteA.pub`` to the
coordinator, who registers it with ``fedmed certs CERTS --add-site A --public-key siteA.pub``
and reads back the same fingerprint. Existing keys are never overwritten without ``--force``.

Example::

    fedmed site-key keys --site A
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedmed.security.site_keys import make_site_key

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``site-key`` subcommand."""
    parser = subparsers.add_parser(
        "site-key",
        help="site: make this site's key pair (send only the .pub to the coordinator)",
        description=(
            "Write siteNAME.key (private, 0600, stays here) and siteNAME.pub (EC P-384, "
            "OpenSSH) into DIR. Send siteNAME.pub to the coordinator, who registers it with "
            "`fedmed certs CERTS --add-site NAME --public-key siteNAME.pub`."
        ),
    )
    parser.add_argument("out", type=Path, metavar="DIR", help="folder for the key pair")
    parser.add_argument("--site", required=True, metavar="NAME", help="this site's name")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing key pair (the coordinator must register the new .pub)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    key = make_site_key(args.out, args.site, force=args.force)
    print(f"private key: {key.private_key}  (stays at this site: [connection] private-key)")
    print(f"public key:  {key.public_key}  (send this file to the coordinator)")
    print(f"fingerprint: {key.fingerprint}  (tell the coordinator, to compare on registration)")
    print(
        f"the coordinator runs: fedmed certs CERTS --add-site {args.site} --public-key "
        f"{key.public_key.name}"
    )
    return 0
