"""Signed global models: the server signs what it sends and what it checkpoints.

Key decision: the signing key is the server's TLS key (``server.key`` from ``fedmed certs``) and
the signature travels with the server certificate (``server.pem``). A site already holds the
federation's ``ca.pem``; it checks that the certificate was issued by that CA, then the
signature with the certificate's public key. No extra key to distribute, and a certificate not
issued by the federation's CA is refused. RSA keys sign with RSA-PSS/SHA-256, EC keys with
ECDSA/SHA-256.

What is signed is canonical JSON (sorted keys, no spaces) of a small payload:

- a train message: ``{"kind": "global-model", "round", "arrays-sha256", "config-sha256"}``
  where ``arrays-sha256`` is :func:`arrays_digest` of the arrays sent and ``config-sha256`` the
  sha256 of the round's canonical train config; the message carries it as ConfigRecord
  ``signature`` (``payload``, ``signature``, ``certificate``);
- a checkpoint: ``{"kind": "checkpoint", "round", "weights_sha256", "meta_sha256",
  "parent_hash"}`` written as ``signature.json`` next to ``meta.json``
  (:mod:`fedmed.security.chain`).

Who is trusted: a :class:`Verifier` with the federation's CA accepts any certificate that CA
issued; one pinned to certificate fingerprints accepts only those (a server whose signing folder
has no ``ca.pem`` checks its own checkpoints this way on resume); a bare ``Verifier()`` checks
only that a signature matches the certificate it carries, which anyone can forge.

Example:
    >>> signer = Signer.from_dir("certs")                    # server.key + server.pem
    >>> record = sign_global(arrays, config, server_round=1, signer=signer)
    >>> verifier = Verifier.from_ca_file("certs/ca.pem")     # at the site
    >>> verify_global(arrays, config, record, server_round=1, verifier=verifier)
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from fedmed.errors import SecurityError

__all__ = [
    "SignatureError",
    "Signer",
    "Verifier",
    "arrays_digest",
    "canonical_json",
    "certificate_fingerprint",
    "sign_global",
    "verify_global",
]

_SIGNED_KEYS = ("payload", "signature", "certificate")


class SignatureError(SecurityError):
    """A signature, its certificate or the signed content does not verify."""

    exit_code = 7


def canonical_json(payload: Mapping[str, Any]) -> bytes:
    """The bytes that are signed and hashed: sorted keys, no whitespace, no NaN."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the arrays in key order: each key, dtype, shape and C-order bytes.

    Example:
        >>> arrays_digest({"w": np.zeros(2, np.float32)})[:8]
        'db048b8c'
    """
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        header = json.dumps([key, value.dtype.str, list(value.shape)], separators=(",", ":"))
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header.encode())
        digest.update(memoryview(value).cast("B"))
    return digest.hexdigest()


def _sha256_text(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def certificate_fingerprint(pem: bytes | str) -> str:
    """sha256 (hex) of a PEM certificate's DER bytes, as ``openssl x509 -fingerprint -sha256``.

    Example:
        >>> certificate_fingerprint(Path("certs/ca.pem").read_bytes())[:8]
        '3f9a0c1e'
    """
    data = pem.encode() if isinstance(pem, str) else pem
    cert = x509.load_pem_x509_certificate(data)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class Signer:
    """The server's private key and certificate (PEM); ``repr`` never shows the key.

    Example:
        >>> signer = Signer.from_dir("certs")
        >>> signed = signer.sign({"round": 1})
        >>> sorted(signed)
        ['certificate', 'payload', 'signature']
    """

    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = field(repr=False)
    certificate_pem: bytes = field(repr=False)
    ca_pem: bytes | None = field(default=None, repr=False)  # the CA that issued the certificate

    @classmethod
    def from_files(
        cls, key_file: str | os.PathLike[str], cert_file: str | os.PathLike[str]
    ) -> Signer:
        """Load an unencrypted PEM private key and its certificate; SecurityError names a file."""
        try:
            key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as err:
            raise SecurityError(
                f"signing key {key_file} cannot be read ({err}): give the server.key written by "
                "`fedmed certs`"
            ) from err
        if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            raise SecurityError(f"signing key {key_file} is not an RSA or EC key")
        try:
            pem = Path(cert_file).read_bytes()
            cert = x509.load_pem_x509_certificate(pem)
        except (OSError, ValueError) as err:
            raise SecurityError(
                f"signing certificate {cert_file} cannot be read ({err}): give the server.pem "
                "written by `fedmed certs`"
            ) from err
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        cert_public = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if public != cert_public:
            raise SecurityError(
                f"signing key {key_file} does not belong to certificate {cert_file}: give the "
                "server.key and server.pem written together by `fedmed certs`"
            )
        return cls(key, pem)

    @classmethod
    def from_dir(cls, certs_dir: str | os.PathLike[str]) -> Signer:
        """``server.key`` and ``server.pem`` in the folder ``fedmed certs`` wrote, with the
        folder's ``ca.pem`` (when present) as the CA that checkpoints are checked against.

        SecurityError when that ``ca.pem`` did not issue ``server.pem``.
        """
        folder = Path(certs_dir)
        signer = cls.from_files(folder / "server.key", folder / "server.pem")
        ca_file = folder / "ca.pem"
        if not ca_file.is_file():
            return signer
        verifier = Verifier.from_ca_file(ca_file)
        try:
            verifier.check_certificate(signer.certificate_pem, what=f"signing certificate {folder}")
        except SignatureError as err:
            raise SecurityError(
                f"{folder / 'server.pem'} was not issued by {ca_file} ({err}): sites holding "
                "that ca.pem would refuse every model; give the folder written by `fedmed certs`"
            ) from err
        return cls(signer.key, signer.certificate_pem, verifier.ca_pem)

    def trust_record(self) -> dict[str, str | None]:
        """What a run records at start so its signatures can be checked later: the signing
        certificate, the CA certificate (when known) and their sha256 fingerprints."""
        return {
            "signing_cert": self.certificate_pem.decode("ascii"),
            "signing_cert_sha256": _sha256_text(self.certificate_pem),
            "signing_cert_fingerprint": certificate_fingerprint(self.certificate_pem),
            "ca_cert": self.ca_pem.decode("ascii") if self.ca_pem else None,
            "ca_sha256": certificate_fingerprint(self.ca_pem) if self.ca_pem else None,
        }

    def sign(self, payload: Mapping[str, Any]) -> dict[str, str]:
        """``{"payload": canonical JSON, "signature": base64, "certificate": PEM}``."""
        data = canonical_json(payload)
        if isinstance(self.key, rsa.RSAPrivateKey):
            sig = self.key.sign(data, _pss(), hashes.SHA256())
        else:
            sig = self.key.sign(data, ec.ECDSA(hashes.SHA256()))
        return {
            "payload": data.decode(),
            "signature": base64.b64encode(sig).decode("ascii"),
            "certificate": self.certificate_pem.decode("ascii"),
        }


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


@dataclass(frozen=True)
class Verifier:
    """Checks signatures; with a CA certificate it also checks who signed.

    ``ca_pem=None`` checks a signature only against the certificate it carries (integrity of
    the file, not who made it): ``fedmed verify`` without ``--ca``.

    Example:
        >>> payload = Verifier.from_ca_file("certs/ca.pem").verify(signed, what="round 3")
    """

    ca_pem: bytes | None = field(default=None, repr=False)
    pinned: frozenset[str] = frozenset()  # certificate fingerprints; empty = any (with the CA)

    @classmethod
    def from_ca_pem(cls, pem: bytes | str, *, what: str) -> Verifier:
        """Trust certificates issued by the CA in ``pem`` (``what`` names where it came from)."""
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            x509.load_pem_x509_certificate(data)
        except ValueError as err:
            raise SecurityError(f"CA certificate in {what} cannot be read ({err})") from err
        return cls(data)

    @classmethod
    def for_signer(cls, signer: Signer) -> Verifier:
        """What ``signer`` signed: certificates of its CA, else only its own certificate."""
        if signer.ca_pem is not None:
            return cls(signer.ca_pem)
        return cls(pinned=frozenset({certificate_fingerprint(signer.certificate_pem)}))

    @property
    def checks_signer(self) -> bool:
        """Whether this verifier checks who signed (a CA or pinned certificates)."""
        return self.ca_pem is not None or bool(self.pinned)

    def check_certificate(self, pem: bytes | str, *, what: str) -> None:
        """SignatureError unless the CA issued ``pem`` (valid now) and it is pinned, if any are."""
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            cert = x509.load_pem_x509_certificate(data)
        except ValueError as err:
            raise SignatureError(f"{what}: certificate is malformed ({err})") from err
        if self.ca_pem is not None:
            self._check_issuer(cert, what=what)
        if self.pinned and certificate_fingerprint(data) not in self.pinned:
            raise SignatureError(
                f"{what}: signed by a certificate ({cert.subject.rfc4514_string()}) that is not "
                "the one this run signs with"
            )

    @classmethod
    def from_ca_file(cls, path: str | os.PathLike[str]) -> Verifier:
        """Trust certificates issued by the CA in ``path`` (the federation's ``ca.pem``)."""
        try:
            pem = Path(path).read_bytes()
            x509.load_pem_x509_certificate(pem)
        except (OSError, ValueError) as err:
            raise SecurityError(
                f"CA certificate {path} cannot be read ({err}): give the ca.pem written by "
                "`fedmed certs`"
            ) from err
        return cls(pem)

    def verify(self, signed: Mapping[str, Any], *, what: str) -> dict[str, Any]:
        """The signed payload as a dict; SignatureError (naming ``what``) when it fails."""
        missing = [k for k in _SIGNED_KEYS if not isinstance(signed.get(k), str)]
        if missing:
            raise SignatureError(f"{what}: signature record lacks {', '.join(missing)}")
        try:
            cert = x509.load_pem_x509_certificate(str(signed["certificate"]).encode())
            sig = base64.b64decode(str(signed["signature"]), validate=True)
            payload = json.loads(str(signed["payload"]))
        except (ValueError, binascii.Error) as err:
            raise SignatureError(f"{what}: signature record is malformed ({err})") from err
        self.check_certificate(str(signed["certificate"]), what=what)
        data = str(signed["payload"]).encode()
        public = cert.public_key()
        try:
            if isinstance(public, rsa.RSAPublicKey):
                public.verify(sig, data, _pss(), hashes.SHA256())
            elif isinstance(public, ec.EllipticCurvePublicKey):
                public.verify(sig, data, ec.ECDSA(hashes.SHA256()))
            else:
                raise SignatureError(f"{what}: certificate key type is not RSA or EC")
        except InvalidSignature as err:
            raise SignatureError(f"{what}: the signature does not match its content") from err
        if not isinstance(payload, dict):
            raise SignatureError(f"{what}: signed payload is not a JSON object")
        return payload

    def _check_issuer(self, cert: x509.Certificate, *, what: str) -> None:
        assert self.ca_pem is not None
        ca = x509.load_pem_x509_certificate(self.ca_pem)
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as err:
            raise SignatureError(
                f"{what}: signed by a certificate ({cert.subject.rfc4514_string()}) that the "
                "federation's CA did not issue"
            ) from err
        now = dt.datetime.now(dt.timezone.utc)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise SignatureError(
                f"{what}: the signing certificate is not valid now (valid "
                f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
            )


# -- global models in train messages ----------------------------------------------------------
def _global_payload(
    arrays: Mapping[str, np.ndarray], config: Mapping[str, Any], server_round: int
) -> dict[str, Any]:
    return {
        "kind": "global-model",
        "round": int(server_round),
        "arrays-sha256": arrays_digest(arrays),
        "config-sha256": _sha256_text(canonical_json(dict(config))),
    }


def sign_global(
    arrays: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    *,
    server_round: int,
    signer: Signer,
) -> dict[str, str]:
    """The ConfigRecord ``signature`` for a train message carrying ``arrays`` and ``config``."""
    return signer.sign(_global_payload(arrays, config, server_round))


def verify_global(
    arrays: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    signed: Mapping[str, Any] | None,
    *,
    server_round: int,
    verifier: Verifier,
) -> None:
    """Refuse (SignatureError) a global model that is unsigned or whose signature fails."""
    what = f"global model of round {server_round}"
    if not signed:
        raise SignatureError(
            f"{what} is unsigned but this site requires signed models (server-ca is set): "
            "the server must sign ([app] signing-dir in federation.toml; fedmed-server sets it "
            "to certs-dir by default), or the site's config must say "
            "require-signed-models = false"
        )
    payload = verifier.verify(signed, what=what)
    expected = _global_payload(arrays, config, server_round)
    for key, value in expected.items():
        if payload.get(key) != value:
            raise SignatureError(
                f"{what}: signed {key} is {payload.get(key)!r} but the message has {value!r} "
                "(altered in transit or replayed)"
            )
