"""A site's own key pair: made at the site, only its public half goes to the coordinator.

Flower authenticates each site (SuperNode) by an EC key pair; the SuperLink allows the public
keys the coordinator registered. :func:`make_site_key` (``fedmed site-key DIR --site A``) writes
``siteA.key`` (OpenSSH private key, mode 0600, in a folder created 0700) and ``siteA.pub``;
the site sends ``siteA.pub`` and its fingerprint (:func:`public_key_fingerprint`, the same as
``ssh-keygen -lf siteA.pub``) to the coordinator, who compares the fingerprint when registering
it (:func:`fedmed.security.pki.register_site`).

Example:
    >>> key = make_site_key(Path("keys"), "A")
    >>> key.public_key.name, key.fingerprint.startswith("SHA256:")
    ('siteA.pub', True)
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmed.errors import ConfigError, SecurityError

from .keyfiles import check_target, make_private_dir, write_key_file

__all__ = [
    "SiteKey",
    "check_site_name",
    "is_valid_site_name",
    "load_ec_public_key",
    "load_site_public_key_pem",
    "make_site_key",
    "openssh_line",
    "public_key_fingerprint",
    "site_key_names",
]

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class SiteKey:
    """A site's key pair as :func:`make_site_key` wrote it, and the public key's fingerprint
    (OpenSSH ``SHA256:...``, to compare over the phone with what the coordinator registers)."""

    private_key: Path
    public_key: Path
    fingerprint: str


def site_key_names(site: str) -> tuple[str, str]:
    """File names of a site's key pair: ``("siteA.key", "siteA.pub")``."""
    return f"site{site}.key", f"site{site}.pub"


def is_valid_site_name(site: str) -> bool:
    """Whether ``site`` is a valid site name: 1-64 letters, digits, '-' or '_'."""
    return bool(_SITE_NAME.match(site))


def check_site_name(site: str) -> str:
    """``site`` when it is a valid site name; ConfigError naming it otherwise."""
    if not is_valid_site_name(site):
        raise ConfigError(
            f"site name {site!r} is invalid: use 1-64 letters, digits, '-' or '_' "
            "starting with a letter or digit"
        )
    return site


def public_key_fingerprint(public: ec.EllipticCurvePublicKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key (``ssh-keygen -lf siteA.pub``)."""
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def openssh_line(public: ec.EllipticCurvePublicKey, site: str) -> bytes:
    """The ``siteX.pub`` file content: ``ecdsa-sha2-nistp384 AAAA... fedmed-site-X``."""
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + f" fedmed-site-{site}\n".encode()


def make_site_key(out_dir: Path, site: str, *, force: bool = False) -> SiteKey:
    """Site side: write ``siteX.key`` (0600) and ``siteX.pub`` into ``out_dir`` (created 0700).

    Run at the site (``fedmed site-key``); only ``siteX.pub`` goes to the coordinator.

    Raises:
        ConfigError: the site name is invalid.
        SecurityError: a key file exists (without ``force``) or is a symlink.
    """
    site = check_site_name(site)
    out_dir = out_dir.expanduser().resolve()
    priv_name, pub_name = site_key_names(site)
    for path in (out_dir / priv_name, out_dir / pub_name):
        if os.path.lexists(path) and not force:
            raise SecurityError(
                f"{path} already exists: refusing to overwrite the site's key (the coordinator "
                "registered its public key); pass --force to make a new pair and register the "
                "new siteX.pub again"
            )
        check_target(path, replace=True)
    make_private_dir(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    write_key_file(out_dir / priv_name, private, private=True, replace=force)
    write_key_file(
        out_dir / pub_name, openssh_line(key.public_key(), site), private=False, replace=force
    )
    return SiteKey(
        out_dir / priv_name, out_dir / pub_name, public_key_fingerprint(key.public_key())
    )


def load_ec_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A site's OpenSSH EC public key (P-256/384/521) from ``path``.

    Raises:
        SecurityError: the file is missing, unreadable or not an EC key on a NIST curve.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SecurityError(
            f"site public key {path} cannot be read ({err.strerror}): register the site with "
            "`fedmed certs CERTS --add-site NAME --public-key FILE` or fix the path in the "
            "[server.sites] table"
        ) from err
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SecurityError(
            f"site public key {path} is not an OpenSSH public key ({err}): use the siteX.pub "
            "file written by `fedmed site-key` at the site"
        ) from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
        key.curve, (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
    ):
        raise SecurityError(
            f"site public key {path} is not an EC key on a NIST curve (P-256/384/521): "
            "Flower's site authentication needs one; make it with `fedmed site-key`"
        )
    return key


def load_site_public_key_pem(path: Path) -> bytes:
    """A site's OpenSSH EC public key as PEM SubjectPublicKeyInfo, the form Flower's Control
    API ``RegisterNode`` expects; SecurityError as :func:`load_ec_public_key`."""
    return load_ec_public_key(path).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
