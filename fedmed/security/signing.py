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
  "parent_hash"}`` written as ``signature.json`` next to ``meta.json``.

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
    "SIGNATURE_FILE",
    "SignatureError",
    "Signer",
    "Verifier",
    "arrays_digest",
    "canonical_json",
    "checkpoint_payload",
    "sign_checkpoint",
    "sign_global",
    "verify_checkpoints",
    "verify_global",
]

SIGNATURE_FILE = "signature.json"
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
        """``server.key`` and ``server.pem`` in the folder ``fedmed certs`` wrote."""
        return cls.from_files(Path(certs_dir) / "server.key", Path(certs_dir) / "server.pem")

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
        if self.ca_pem is not None:
            self._check_issuer(cert, what=what)
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


# -- checkpoints ---------------------------------------------------------------------------
def checkpoint_payload(folder: Path) -> dict[str, Any]:
    """What a checkpoint's signature covers, read from its ``meta.json``."""
    meta_bytes = (folder / "meta.json").read_bytes()
    meta = json.loads(meta_bytes)
    return {
        "kind": "checkpoint",
        "round": int(meta["round"]),
        "weights_sha256": meta["weights_sha256"],
        "parent_hash": meta["parent_hash"],
        "meta_sha256": _sha256_text(meta_bytes),
    }


def sign_checkpoint(
    folder: str | os.PathLike[str], signer: Signer, *, audit_sha256: str | None = None
) -> Path:
    """Write ``signature.json`` into a checkpoint folder (atomically); return its path.

    ``audit_sha256`` (the hash of the audit line of this round) is signed along, so a
    truncated audit log shows up in :func:`verify_checkpoints`.
    """
    folder = Path(folder)
    payload = checkpoint_payload(folder)
    if audit_sha256 is not None:
        payload["audit_sha256"] = audit_sha256
    signed = signer.sign(payload)
    path = folder / SIGNATURE_FILE
    tmp = folder / f".{SIGNATURE_FILE}.tmp"
    tmp.write_text(json.dumps(signed, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _round_folders(root: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in root.iterdir():
        name = entry.name
        if entry.is_dir() and name.startswith("round-") and name[6:].isdigit():
            found.append((int(name[6:]), entry))
    return sorted(found)


def verify_checkpoints(
    root: str | os.PathLike[str],
    *,
    verifier: Verifier | None = None,
    require_signatures: bool = False,
    audit_lines: set[str] | None = None,
) -> tuple[list[int], list[int]]:
    """Check every round of a checkpoint folder; return (rounds checked, rounds signed).

    Each round must exist from 0 on, its files must match ``meta.json``, its ``parent_hash``
    must be the round before's weights hash and, where ``signature.json`` is present (required
    with ``require_signatures``), the signature must cover exactly that ``meta.json`` and, with
    ``audit_lines`` (:func:`fedmed.security.audit.line_hashes`), the audit line it names must
    be in the log. SignatureError names the first broken link.
    """
    root = Path(root)
    if not root.is_dir():
        raise SecurityError(f"checkpoint folder {root} does not exist")
    verifier = verifier or Verifier()
    rounds: list[int] = []
    signed: list[int] = []
    parent: str | None = None
    for expected, (round_, folder) in enumerate(_round_folders(root)):
        if round_ != expected:
            raise SignatureError(f"first broken link: round {expected} is missing in {root}")
        where = f"first broken link: round {round_} ({folder})"
        try:
            meta = json.loads((folder / "meta.json").read_text())
            weights_hash = _file_sha256(folder / "weights.safetensors")
            state_hash = _file_sha256(folder / "server_state.safetensors")
        except (OSError, ValueError) as err:
            raise SignatureError(f"{where}: cannot be read ({err})") from err
        if meta.get("round") != round_:
            raise SignatureError(f"{where}: meta.json says round {meta.get('round')}")
        if weights_hash != meta.get("weights_sha256"):
            raise SignatureError(f"{where}: weights.safetensors does not match meta.json")
        if state_hash != meta.get("server_state_sha256"):
            raise SignatureError(f"{where}: server_state.safetensors does not match meta.json")
        if meta.get("parent_hash") != parent:
            raise SignatureError(
                f"{where}: parent_hash {str(meta.get('parent_hash'))[:12]} is not the hash "
                f"{str(parent)[:12]} of the round before"
            )
        sig_file = folder / SIGNATURE_FILE
        if sig_file.is_file():
            try:
                record = json.loads(sig_file.read_text())
            except (OSError, ValueError) as err:
                raise SignatureError(f"{where}: {SIGNATURE_FILE} cannot be read ({err})") from err
            payload = verifier.verify(record, what=where)
            audit_hash = payload.pop("audit_sha256", None)
            if payload != checkpoint_payload(folder):
                raise SignatureError(f"{where}: the signature does not cover this meta.json")
            if audit_lines is not None and audit_hash is not None and audit_hash not in audit_lines:
                raise SignatureError(
                    f"{where}: the audit line signed with this round ({audit_hash[:12]}) is not in "
                    "the audit log: the log was truncated or altered"
                )
            signed.append(round_)
        elif require_signatures:
            raise SignatureError(f"{where}: {SIGNATURE_FILE} is missing (unsigned checkpoint)")
        rounds.append(round_)
        parent = weights_hash
    return rounds, signed
