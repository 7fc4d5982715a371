"""Certificates and site keys for a federation: a CA, a TLS server certificate, site key pairs.

The layout written by :func:`write_pki` (file names are fixed; :mod:`fedmed.config` and the
example configs refer to them)::

    OUT/ca.pem  ca.key            the certificate authority (RSA-2048, BasicConstraints ca=True)
    OUT/server.pem  server.key    the SuperLink's TLS certificate, signed by the CA
    OUT/siteA.key  siteA.pub      one EC P-384 key pair per site, OpenSSH format
    OUT/sites.json                manifest: {"sites": {"A": "siteA.pub", ...}, ...}

The server certificate carries a SAN for every address the sites use plus ``localhost``,
``127.0.0.1`` and ``::1``: the SuperLink's own executor connects to ``https://127.0.0.1:PORT``.
Sites send their public key to the coordinator; the private key never leaves the site.

Example:
    >>> manifest = write_pki(Path("certs"), server_hosts=["fl.example.org"], sites=["A", "B"])
    >>> manifest.site_public_keys["A"].name
    'siteA.pub'
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmed.errors import ConfigError, SecurityError

__all__ = [
    "LOOPBACK_HOSTS",
    "PkiManifest",
    "is_valid_site_name",
    "load_site_public_key_pem",
    "site_key_names",
    "write_pki",
]

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_HOST_NAME = re.compile(r"^[A-Za-z0-9*]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?$")
_VALIDITY = dt.timedelta(days=825)
MANIFEST_NAME = "sites.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PkiManifest:
    """What :func:`write_pki` wrote (absolute paths)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    server_hosts: tuple[str, ...]
    site_private_keys: dict[str, Path]
    site_public_keys: dict[str, Path]
    manifest: Path


def site_key_names(site: str) -> tuple[str, str]:
    """File names of a site's key pair: ``("siteA.key", "siteA.pub")``."""
    return f"site{site}.key", f"site{site}.pub"


def is_valid_site_name(site: str) -> bool:
    """Whether ``site`` is a valid site name: 1-64 letters, digits, '-' or '_'."""
    return bool(_SITE_NAME.match(site))


def _check_site(site: str) -> str:
    if not is_valid_site_name(site):
        raise ConfigError(
            f"site name {site!r} is invalid: use 1-64 letters, digits, '-' or '_' "
            "starting with a letter or digit"
        )
    return site


def _san_for(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST_NAME.match(host):
        raise ConfigError(
            f"server address {host!r} is neither an IP address nor a DNS name: "
            "give host names without scheme or port, e.g. fl.example.org or 10.0.0.5"
        )
    return x509.DNSName(host.rstrip("."))


def _write_private(path: Path, data: bytes) -> None:
    # Create with 0600 from the start: a chmod after writing leaves a readable window.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _pem_private(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_ca(now: dt.datetime) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmed federation CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server_cert(
    ca_key: rsa.RSAPrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str], now: dt.datetime
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sans = [_san_for(h) for h in hosts]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _unique_hosts(server_hosts: Sequence[str]) -> tuple[str, ...]:
    hosts: list[str] = []
    for host in [*server_hosts, *LOOPBACK_HOSTS]:
        host = host.strip().strip("[]")
        if host and host not in hosts:
            hosts.append(host)
    return tuple(hosts)


def write_pki(
    out_dir: Path,
    *,
    server_hosts: Sequence[str],
    sites: Sequence[str],
    force: bool = False,
) -> PkiManifest:
    """Write a CA, a server certificate for ``server_hosts`` and one key pair per site.

    Private keys are created with mode 0600. Existing files are never overwritten unless
    ``force`` is set (a new CA invalidates every site's trust anchor; a new site key must be
    registered again), so re-running by accident cannot lock sites out.

    Raises:
        ConfigError: a site name or host is invalid, or no site is given.
        SecurityError: a file to write exists and ``force`` is not set.
    """
    sites = [_check_site(s.strip()) for s in sites if s.strip()]
    if not sites:
        raise ConfigError("--sites is empty: name at least one site, e.g. --sites A,B")
    if len(set(sites)) != len(sites):
        raise ConfigError(f"--sites lists a site twice: {','.join(sites)}")
    hosts = _unique_hosts(server_hosts)
    for host in hosts:
        _san_for(host)  # validate all hosts before writing anything
    out_dir = out_dir.expanduser().resolve()
    targets = ["ca.pem", "ca.key", "server.pem", "server.key", MANIFEST_NAME]
    for site in sites:
        targets.extend(site_key_names(site))
    existing = [name for name in targets if (out_dir / name).exists()]
    if existing and not force:
        raise SecurityError(
            f"{out_dir} already holds {', '.join(existing)}: refusing to overwrite keys "
            "(sites would need new certificates and registrations); pass --force to replace "
            "them or choose another folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, ca_cert = _make_ca(now)
    server_key, server_cert = _make_server_cert(ca_key, ca_cert, hosts, now)
    _write_private(out_dir / "ca.key", _pem_private(ca_key))
    (out_dir / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out_dir / "server.key", _pem_private(server_key))
    (out_dir / "server.pem").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))

    private_keys: dict[str, Path] = {}
    public_keys: dict[str, Path] = {}
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        priv_name, pub_name = site_key_names(site)
        private_keys[site] = out_dir / priv_name
        public_keys[site] = out_dir / pub_name
        _write_private(
            private_keys[site],
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        public_keys[site].write_bytes(public + f" fedmed-site-{site}\n".encode())

    manifest_path = out_dir / MANIFEST_NAME
    manifest_path.write_text(
        json.dumps(
            {
                "ca": "ca.pem",
                "server_certificate": "server.pem",
                "server_hosts": list(hosts),
                "sites": {site: public_keys[site].name for site in sites},
            },
            indent=2,
        )
        + "\n"
    )
    log.info(
        "wrote CA, server certificate (%s) and %d site keys to %s",
        ", ".join(hosts),
        len(sites),
        out_dir,
    )
    return PkiManifest(
        ca_cert=out_dir / "ca.pem",
        server_cert=out_dir / "server.pem",
        server_key=out_dir / "server.key",
        server_hosts=hosts,
        site_private_keys=private_keys,
        site_public_keys=public_keys,
        manifest=manifest_path,
    )


def load_site_public_key_pem(path: Path) -> bytes:
    """Read a site's OpenSSH EC public key and return it as PEM SubjectPublicKeyInfo.

    This is the form Flower's Control API ``RegisterNode`` expects.

    Raises:
        SecurityError: the file is missing, unreadable or not an EC key on a NIST curve.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SecurityError(
            f"site public key {path} cannot be read ({err.strerror}): run `fedmed certs` or "
            "fix the path in the [server] sites table"
        ) from err
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SecurityError(
            f"site public key {path} is not an OpenSSH public key ({err}): use the siteX.pub "
            "file written by `fedmed certs`"
        ) from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
        key.curve, (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
    ):
        raise SecurityError(
            f"site public key {path} is not an EC key on a NIST curve (P-256/384/521): "
            "Flower's site authentication needs one; use `fedmed certs`"
        )
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
