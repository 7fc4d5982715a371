"""fedmed certs: CA, server certificate and site keys that Flower accepts."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedmed.cli.main import main as fedmed_main
from fedmed.errors import ConfigError, SecurityError
from fedmed.security.pki import load_site_public_key_pem, write_pki


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
    for path in [pki.server_key, pki.ca_cert.with_name("ca.key"), *pki.site_private_keys.values()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_manifest_lists_sites_and_public_keys(pki) -> None:
    import json

    manifest = json.loads(pki.manifest.read_text())
    assert manifest["sites"] == {"A": "siteA.pub", "B": "siteB.pub"}
    assert "127.0.0.1" in manifest["server_hosts"]


def test_public_key_pem_is_what_flower_registers(pki) -> None:
    pem = load_site_public_key_pem(pki.site_public_keys["A"])
    public = serialization.load_ssh_public_key(pki.site_public_keys["A"].read_bytes())
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert serialization.load_pem_public_key(pem).public_numbers() == public.public_numbers()


def test_refuses_to_overwrite_existing_keys(pki) -> None:
    before = pki.site_private_keys["A"].read_bytes()
    with pytest.raises(SecurityError, match=r"refusing to overwrite keys.*--force"):
        write_pki(pki.ca_cert.parent, server_hosts=["x.org"], sites=["A"])
    assert pki.site_private_keys["A"].read_bytes() == before


def test_force_replaces_keys(tmp_path: Path) -> None:
    first = write_pki(tmp_path, server_hosts=[], sites=["A"])
    old = first.site_private_keys["A"].read_bytes()
    second = write_pki(tmp_path, server_hosts=[], sites=["A"], force=True)
    assert second.site_private_keys["A"].read_bytes() != old


@pytest.mark.parametrize(
    ("hosts", "sites", "match"),
    [
        (["https://x.org:9092"], ["A"], "neither an IP address nor a DNS name"),
        (["x.org"], ["../A"], "site name '../A' is invalid"),
        (["x.org"], [], "--sites is empty"),
        (["x.org"], ["A", "A"], "lists a site twice"),
    ],
    ids=["url-host", "path-site", "no-site", "duplicate"],
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


def test_cli_writes_certs_and_refuses_second_run(tmp_path: Path, capsys) -> None:
    args = ["certs", str(tmp_path), "--server-address", "127.0.0.1,fl.local", "--sites", "A,B,C"]
    assert fedmed_main(args) == 0
    assert sorted(
        p.name
        for p in tmp_path.iterdir()
        if p.suffix in (".key", ".pub") and p.name.startswith("site")
    ) == [
        "siteA.key",
        "siteA.pub",
        "siteB.key",
        "siteB.pub",
        "siteC.key",
        "siteC.pub",
    ]
    assert fedmed_main(args) == SecurityError.exit_code
    assert "refusing to overwrite" in capsys.readouterr().err
