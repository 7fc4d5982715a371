"""The PKI: a CA kept away from the server's certs, a server certificate, site keys made at the
sites and registered by their public half, and key writes that never follow a symlink."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedmed.cli.main import main as fedmed_main
from fedmed.errors import ConfigError, SecurityError
from fedmed.security.pki import (
    init_pki,
    load_site_public_key_pem,
    make_site_key,
    register_site,
    write_pki,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("pki")
    return write_pki(out, server_hosts=["fl.example.org", "10.1.2.3"], sites=["A", "B"])


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_is_signed_by_the_ca(pki) -> None:
    ca, server = _cert(pki.ca_cert), _cert(pki.server_cert)

    server.verify_directly_issued_by(ca)  # raises when the signature or issuer is wrong

    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert isinstance(ca.public_key(), rsa.RSAPublicKey)
    assert ca.public_key().key_size == 2048


def test_server_certificate_has_sans_for_given_hosts_and_loopback(pki) -> None:
    server = _cert(pki.server_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage


def test_server_key_matches_certificate(pki) -> None:
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == _cert(pki.server_cert).public_key().public_numbers()


def test_site_keys_are_openssh_ec_p384_pairs(pki) -> None:
    for site in ("A", "B"):
        private = serialization.load_ssh_private_key(
            pki.site_private_keys[site].read_bytes(), password=None
        )
        public = serialization.load_ssh_public_key(pki.site_public_keys[site].read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
    assert pki.site_public_keys["A"].name == "siteA.pub"
    assert pki.site_public_keys["A"].read_bytes() != pki.site_public_keys["B"].read_bytes()


def test_private_keys_are_readable_by_owner_only(pki) -> None:
    for path in [pki.server_key, pki.ca_key, *pki.site_private_keys.values()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(pki.ca_key.parent.stat().st_mode) == 0o700


def test_manifest_lists_sites_and_public_keys(pki) -> None:
    manifest = json.loads(pki.manifest.read_text())
    assert manifest["sites"] == {"A": "siteA.pub", "B": "siteB.pub"}
    assert "127.0.0.1" in manifest["server_hosts"]


def test_public_key_pem_is_what_flower_registers(pki) -> None:
    pem = load_site_public_key_pem(pki.site_public_keys["A"])
    public = serialization.load_ssh_public_key(pki.site_public_keys["A"].read_bytes())
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert serialization.load_pem_public_key(pem).public_numbers() == public.public_numbers()


def test_refuses_to_overwrite_existing_keys(pki) -> None:
    before = pki.server_key.read_bytes()
    with pytest.raises(SecurityError, match=r"refusing to overwrite keys.*--force"):
        init_pki(pki.ca_cert.parent, server_hosts=["x.org"])
    assert pki.server_key.read_bytes() == before


def test_force_replaces_keys(tmp_path: Path) -> None:
    first = write_pki(tmp_path / "certs", server_hosts=[], sites=["A"])
    old = first.site_private_keys["A"].read_bytes(), first.ca_key.read_bytes()
    second = write_pki(tmp_path / "certs", server_hosts=[], sites=["A"], force=True)
    assert second.site_private_keys["A"].read_bytes() != old[0]
    assert second.ca_key.read_bytes() != old[1]


@pytest.mark.parametrize(
    ("hosts", "sites", "match"),
    [
        (["https://x.org:9092"], ["A"], "neither an IP address nor a DNS name"),
        (["x.org"], ["../A"], "site name '../A' is invalid"),
        (["x.org"], ["A", "A"], "lists a site twice"),
    ],
    ids=["url-host", "path-site", "duplicate"],
)
def test_invalid_input_is_refused_before_writing(tmp_path, hosts, sites, match) -> None:
    with pytest.raises(ConfigError, match=match):
        write_pki(tmp_path / "out", server_hosts=hosts, sites=sites)
    assert not (tmp_path / "out").exists()


def test_load_public_key_refuses_rsa_and_garbage(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (tmp_path / "rsa.pub").write_bytes(
        rsa_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    (tmp_path / "bad.pub").write_text("not a key")
    with pytest.raises(SecurityError, match="not an EC key on a NIST curve"):
        load_site_public_key_pem(tmp_path / "rsa.pub")
    with pytest.raises(SecurityError, match="not an OpenSSH public key"):
        load_site_public_key_pem(tmp_path / "bad.pub")
    with pytest.raises(SecurityError, match="cannot be read"):
        load_site_public_key_pem(tmp_path / "missing.pub")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_certs_writes_the_ca_key_outside_the_servers_certs_folder(tmp_path: Path, capsys) -> None:
    # Execute: the coordinator sets up the federation
    args = ["certs", str(tmp_path / "certs"), "--server-address", "127.0.0.1,fl.local"]
    assert fedmed_main(args) == 0

    # Assert: certs/ holds only what the server reads; the CA key is in certs-ca/, 0700
    assert sorted(_files(tmp_path / "certs")) == [
        "ca.pem",
        "server.key",
        "server.pem",
        "sites.json",
    ]
    ca_dir = tmp_path / "certs-ca"
    assert sorted(_files(ca_dir)) == ["ca.key", "ca.pem"]
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert "keep it offline" in capsys.readouterr().out
    # a second run never replaces the CA; --ca-dir inside certs is refused
    assert fedmed_main(args) == SecurityError.exit_code
    assert "refusing to overwrite" in capsys.readouterr().err
    inside = [*args, "--ca-dir", str(tmp_path / "certs" / "ca"), "--force"]
    assert fedmed_main(inside) == ConfigError.exit_code
    assert "inside the server's certs folder" in capsys.readouterr().err


def test_a_site_makes_its_key_and_the_coordinator_registers_only_its_public_key(
    tmp_path: Path, capsys
) -> None:
    # Prepare: a federation set up once
    certs = tmp_path / "certs"
    assert fedmed_main(["certs", str(certs), "--server-address", "127.0.0.1"]) == 0
    before = {**_files(certs), **_files(tmp_path / "certs-ca")}
    capsys.readouterr()

    # Execute: site C makes its own pair; the coordinator registers the .pub
    site_dir = tmp_path / "site-C" / "keys"
    assert fedmed_main(["site-key", str(site_dir), "--site", "C"]) == 0
    site_out = capsys.readouterr().out
    pub = site_dir / "siteC.pub"
    add = ["certs", str(certs), "--add-site", "C", "--public-key", str(pub)]
    assert fedmed_main(add) == 0
    coordinator_out = capsys.readouterr().out

    # Assert: the CA and server files are untouched, C is allow-listed, the fingerprints agree
    after = {**_files(certs), **_files(tmp_path / "certs-ca")}
    assert {k: v for k, v in after.items() if k in before and k != "sites.json"} == {
        k: v for k, v in before.items() if k != "sites.json"
    }
    public = serialization.load_ssh_public_key((certs / "siteC.pub").read_bytes())
    private = serialization.load_ssh_private_key((site_dir / "siteC.key").read_bytes(), None)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert json.loads((certs / "sites.json").read_text())["sites"] == {"C": "siteC.pub"}
    blob = base64.b64decode(pub.read_text().split()[1])  # as `ssh-keygen -lf` computes it
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert fingerprint in site_out and fingerprint in coordinator_out
    assert stat.S_IMODE((site_dir / "siteC.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(site_dir.stat().st_mode) == 0o700
    # registering the same key again changes nothing
    assert fedmed_main(add) == 0


def test_no_coordinator_command_makes_a_site_private_key(tmp_path: Path, capsys) -> None:
    certs = tmp_path / "certs"
    old_form = ["certs", str(certs), "--server-address", "127.0.0.1", "--sites", "A,B"]

    assert fedmed_main(old_form) == ConfigError.exit_code
    assert "fedmed site-key" in capsys.readouterr().err
    assert not certs.exists()
    assert fedmed_main(["certs", str(certs), "--server-address", "127.0.0.1"]) == 0
    for folder in (certs, tmp_path / "certs-ca"):
        for name, data in _files(folder).items():
            if name.endswith(".key") or b"PRIVATE KEY" in data:
                assert name in ("server.key", "ca.key"), name


def test_registration_refuses_private_keys_other_keys_and_shared_keys(tmp_path: Path) -> None:
    # Prepare
    pki = init_pki(tmp_path / "certs", server_hosts=["127.0.0.1"])
    a = make_site_key(tmp_path / "site-A", "A")
    b = make_site_key(tmp_path / "site-B", "B")
    register_site(pki.ca_cert.parent, "A", a.public_key)

    # Execute + Assert
    with pytest.raises(SecurityError, match="is a private key: it must never leave site A"):
        register_site(pki.ca_cert.parent, "A", a.private_key)
    with pytest.raises(SecurityError, match="site A is already registered with another key"):
        register_site(pki.ca_cert.parent, "A", b.public_key)
    with pytest.raises(SecurityError, match="already registered as site A"):
        register_site(pki.ca_cert.parent, "C", a.public_key)
    register_site(pki.ca_cert.parent, "A", b.public_key, force=True)
    registered = serialization.load_ssh_public_key((pki.ca_cert.parent / "siteA.pub").read_bytes())
    assert (
        registered.public_numbers()
        == serialization.load_ssh_public_key(b.public_key.read_bytes()).public_numbers()
    )
    with pytest.raises(ConfigError, match=r"holds no ca\.pem"):
        register_site(tmp_path / "elsewhere", "B", b.public_key)


@pytest.mark.parametrize("name", ["server.key", "ca.pem", "server.pem"])
def test_a_dangling_symlink_never_redirects_a_key_write(tmp_path: Path, name: str) -> None:
    # Prepare: someone planted a link where fedmed certs writes
    certs = tmp_path / "certs"
    certs.mkdir()
    target = tmp_path / "attacker" / "stolen"
    target.parent.mkdir()
    os.symlink(target, certs / name)

    # Execute + Assert: refused, even with --force, and nothing written through the link
    for force in (False, True):
        with pytest.raises(SecurityError, match="is a symbolic link"):
            init_pki(certs, server_hosts=["127.0.0.1"], force=force)
    assert not target.exists()
    assert not (tmp_path / "certs-ca" / "ca.key").exists()


def test_a_site_key_is_never_written_through_a_symlink(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    target = tmp_path / "stolen.key"
    os.symlink(target, keys / "siteA.key")

    for force in (False, True):
        with pytest.raises(SecurityError, match=r"siteA\.key"):
            make_site_key(keys, "A", force=force)
    assert not target.exists()
