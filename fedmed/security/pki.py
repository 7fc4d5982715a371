"""The federation's PKI: a CA, the server's TLS certificate, and site keys made at the sites.

Who makes what (nobody but a site ever holds its private key):

- the coordinator, once: :func:`init_pki` (``fedmed certs CERTS --server-address HOST``) makes
  the CA and the server's certificate;
- each site: :func:`make_site_key` (``fedmed site-key DIR --site A``) makes the site's EC P-384
  key pair (OpenSSH format) and the site sends only ``siteA.pub`` to the coordinator;
- the coordinator, per site: :func:`register_site` (``fedmed certs CERTS --add-site A
  --public-key siteA.pub``) copies the public key into the server's certs folder, where the
  ``[server.sites]`` allow-list points; the CA is not touched.

Layout (file names are fixed; :mod:`fedmed.config` and the example configs refer to them)::

    CERTS/               the server's certs-dir ([server] certs-dir)
        ca.pem               the federation CA certificate (give it to every site)
        server.pem server.key  the SuperLink's TLS certificate (signed by the CA) and key,
                             which also signs global models and checkpoints
        siteA.pub ...        registered site public keys (the allow-list's files)
        sites.json           manifest: {"sites": {"A": "siteA.pub", ...}, "server_hosts", ...}
    CERTS-ca/            the CA (default: next to CERTS, its name + "-ca"; folder mode 0700)
        ca.key ca.pem        the CA's private key: keep it offline, never in CERTS (fedmed-server
                             warns when it finds one there); needed only for a new server cert
    SITE/ (at a site)    siteA.key (0600, never leaves the site) siteA.pub (to the coordinator)

The server certificate carries a SAN for every address the sites use plus ``localhost``,
``127.0.0.1`` and ``::1``: the SuperLink's own executor connects to ``https://127.0.0.1:PORT``.
Every key and certificate is written by :func:`fedmed.security.keyfiles.write_key_file`:
never through a symlink, private keys 0600 from creation, nothing overwritten without
``force``. :func:`write_pki` plays the coordinator *and* the sites on one machine, for tests
and local demos only; no ``fedmed`` command calls it.

Example:
    >>> manifest = init_pki(Path("certs"), server_hosts=["fl.example.org"])
    >>> key = make_site_key(Path("site-A/keys"), "A")                # at site A
    >>> register_site(Path("certs"), "A", key.public_key).name       # at the coordinator
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
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmed.errors import ConfigError, SecurityError

from .keyfiles import check_target, make_private_dir, write_key_file
from .site_keys import (
    check_site_name,
    is_valid_site_name,
    load_ec_public_key,
    load_site_public_key_pem,
    make_site_key,
    openssh_line,
    public_key_fingerprint,
    site_key_names,
)

__all__ = [  # the site-side names are re-exported from .site_keys
    "LOOPBACK_HOSTS",
    "MANIFEST_NAME",
    "PkiManifest",
    "default_ca_dir",
    "init_pki",
    "is_valid_site_name",
    "load_site_public_key_pem",
    "make_site_key",
    "register_site",
    "site_key_names",
    "write_pki",
]

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_HOST_NAME = re.compile(r"^[A-Za-z0-9*]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?$")
_VALIDITY = dt.timedelta(days=825)
MANIFEST_NAME = "sites.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PkiManifest:
    """What :func:`init_pki` (and :func:`write_pki`) wrote (absolute paths).

    ``site_private_keys`` is filled only by :func:`write_pki`, which plays the sites too.
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    server_hosts: tuple[str, ...]
    manifest: Path
    site_public_keys: dict[str, Path] = field(default_factory=dict)
    site_private_keys: dict[str, Path] = field(default_factory=dict)


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


def default_ca_dir(certs_dir: Path) -> Path:
    """Where :func:`init_pki` puts the CA by default: ``<certs_dir>-ca`` next to it."""
    certs_dir = certs_dir.expanduser().resolve()
    return certs_dir.parent / f"{certs_dir.name}-ca"


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _read_manifest(certs_dir: Path) -> dict[str, object]:
    path = certs_dir / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SecurityError(f"{path} cannot be read ({err}): restore it or remove it") from err
    return data if isinstance(data, dict) else {}


def _write_manifest(certs_dir: Path, manifest: dict[str, object]) -> Path:
    path = certs_dir / MANIFEST_NAME
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    return write_key_file(path, text.encode(), private=False, replace=path.exists())


def init_pki(
    certs_dir: Path,
    *,
    server_hosts: Sequence[str],
    ca_dir: Path | None = None,
    force: bool = False,
) -> PkiManifest:
    """Write the CA into ``ca_dir`` and the server's certificate into ``certs_dir`` (module doc).

    ``ca_dir`` defaults to :func:`default_ca_dir` and must lie outside ``certs_dir``. Site
    public keys registered before stay registered (a new CA does not change them; the sites
    need the new ``ca.pem``). Nothing is overwritten unless ``force`` is set.

    Raises:
        ConfigError: a host is invalid, or ``ca_dir`` is inside ``certs_dir``.
        SecurityError: a file to write exists (without ``force``) or is a symlink.
    """
    hosts = _unique_hosts(server_hosts)
    for host in hosts:
        _san_for(host)  # validate all hosts before writing anything
    certs_dir = certs_dir.expanduser().resolve()
    ca_dir = ca_dir.expanduser().resolve() if ca_dir is not None else default_ca_dir(certs_dir)
    if ca_dir == certs_dir or ca_dir.is_relative_to(certs_dir):
        raise ConfigError(
            f"--ca-dir {ca_dir} is inside the server's certs folder {certs_dir}: the CA's private "
            "key must not sit where the server reads its certificates; give another folder"
        )
    targets = [certs_dir / n for n in ("ca.pem", "server.pem", "server.key")]
    targets += [ca_dir / "ca.key", ca_dir / "ca.pem"]
    existing = [path for path in targets if os.path.lexists(path)]
    for path in existing:
        check_target(path, replace=True)  # a symlink is refused even with force
    if existing and not force:
        raise SecurityError(
            f"{', '.join(str(p) for p in existing)} already exist: refusing to overwrite keys "
            "(every site would need the new ca.pem); pass --force to replace them or choose "
            "another folder; to add a site use --add-site"
        )
    certs_dir.mkdir(parents=True, exist_ok=True)
    make_private_dir(ca_dir)

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, ca_cert = _make_ca(now)
    server_key, server_cert = _make_server_cert(ca_key, ca_cert, hosts, now)
    write_key_file(ca_dir / "ca.key", _pem_private(ca_key), private=True, replace=force)
    write_key_file(ca_dir / "ca.pem", _pem(ca_cert), private=False, replace=force)
    write_key_file(certs_dir / "ca.pem", _pem(ca_cert), private=False, replace=force)
    write_key_file(certs_dir / "server.key", _pem_private(server_key), private=True, replace=force)
    write_key_file(certs_dir / "server.pem", _pem(server_cert), private=False, replace=force)
    sites = _read_manifest(certs_dir).get("sites")
    registered = sites if isinstance(sites, dict) else {}  # site keys outlive a new CA
    manifest_path = _write_manifest(
        certs_dir,
        {
            "ca": "ca.pem",
            "server_certificate": "server.pem",
            "server_hosts": list(hosts),
            "sites": registered,
        },
    )
    log.info(
        "wrote CA to %s and server certificate (%s) to %s", ca_dir, ", ".join(hosts), certs_dir
    )
    return PkiManifest(
        ca_cert=certs_dir / "ca.pem",
        ca_key=ca_dir / "ca.key",
        server_cert=certs_dir / "server.pem",
        server_key=certs_dir / "server.key",
        server_hosts=hosts,
        manifest=manifest_path,
        site_public_keys={str(k): certs_dir / str(v) for k, v in registered.items()},
    )


def register_site(certs_dir: Path, site: str, public_key: Path, *, force: bool = False) -> Path:
    """Coordinator side: copy site ``site``'s public key into ``certs_dir`` as ``siteX.pub``
    and list it in ``sites.json``; return the registered file. The CA is not touched.

    Registering the same key again is a no-op; another key for a registered site needs
    ``force`` (the old key can then no longer join), and one key cannot serve two sites.

    Raises:
        ConfigError: the site name is invalid or ``certs_dir`` was not set up by
            :func:`init_pki`.
        SecurityError: ``public_key`` is not a site public key (or is a private key), or the
            registration would replace another key without ``force``.
    """
    site = check_site_name(site)
    certs_dir = certs_dir.expanduser().resolve()
    if not (certs_dir / "ca.pem").is_file():
        raise ConfigError(
            f"{certs_dir} holds no ca.pem: set up the federation first with `fedmed certs "
            f"{certs_dir} --server-address HOST`"
        )
    try:
        head = public_key.read_bytes()[:4096]
    except OSError as err:
        raise SecurityError(
            f"site public key {public_key} cannot be read ({err.strerror})"
        ) from err
    if b"PRIVATE KEY" in head:
        raise SecurityError(
            f"{public_key} is a private key: it must never leave site {site}; ask the site for "
            f"its site{site}.pub (from `fedmed site-key`) and delete this copy"
        )
    key = load_ec_public_key(public_key)
    fingerprint = public_key_fingerprint(key)
    dest = certs_dir / site_key_names(site)[1]
    manifest = _read_manifest(certs_dir)
    raw = manifest.get("sites")
    sites = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    for other, name in sites.items():
        other_path = certs_dir / name
        if other == site or not other_path.is_file() or other_path.is_symlink():
            continue
        if public_key_fingerprint(load_ec_public_key(other_path)) == fingerprint:
            raise SecurityError(
                f"{public_key} ({fingerprint}) is already registered as site {other}: each "
                "site makes its own key with `fedmed site-key`"
            )
    exists = check_target(dest, replace=True)  # refuses a symlink at dest
    current = public_key_fingerprint(load_ec_public_key(dest)) if exists else None
    if current is not None and current != fingerprint and not force:
        raise SecurityError(
            f"site {site} is already registered with another key ({dest}, {current}; new "
            f"{fingerprint}): pass --force to replace it (the old key can then no longer "
            "join), or register the new key under another site name"
        )
    if current != fingerprint:
        write_key_file(dest, openssh_line(key, site), private=False, replace=exists)
    _write_manifest(certs_dir, {**manifest, "sites": {**sites, site: dest.name}})
    log.info("registered site %s (%s) as %s", site, fingerprint, dest)
    return dest


def write_pki(
    out_dir: Path,
    *,
    server_hosts: Sequence[str],
    sites: Sequence[str],
    force: bool = False,
) -> PkiManifest:
    """Tests and local demos only: a whole federation's PKI on one machine.

    Plays the coordinator (:func:`init_pki` into ``out_dir``, CA in ``<out_dir>-ca``) and every
    site (:func:`make_site_key` into ``<out_dir>-sites``, then :func:`register_site`). A real
    coordinator never makes a site's private key; no ``fedmed`` command calls this.

    Raises:
        ConfigError: a site name or host is invalid, or a site is listed twice.
        SecurityError: a file to write exists and ``force`` is not set.
    """
    names = [check_site_name(s.strip()) for s in sites if s.strip()]
    if len(set(names)) != len(names):
        raise ConfigError(f"sites lists a site twice: {','.join(names)}")
    for host in _unique_hosts(server_hosts):
        _san_for(host)
    out_dir = out_dir.expanduser().resolve()
    manifest = init_pki(out_dir, server_hosts=server_hosts, force=force)
    site_dir = out_dir.parent / f"{out_dir.name}-sites"
    private: dict[str, Path] = {}
    public: dict[str, Path] = {}
    for site in names:
        key = make_site_key(site_dir, site, force=force)
        private[site] = key.private_key
        public[site] = register_site(out_dir, site, key.public_key, force=force)
    return PkiManifest(
        ca_cert=manifest.ca_cert,
        ca_key=manifest.ca_key,
        server_cert=manifest.server_cert,
        server_key=manifest.server_key,
        server_hosts=manifest.server_hosts,
        manifest=manifest.manifest,
        site_public_keys=public,
        site_private_keys=private,
    )
