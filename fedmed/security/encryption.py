"""Encryption at rest with AES-256-GCM (persistent caches, checkpoints).

A sealed blob is ``header || ciphertext+tag`` where the header is::

    b"FMENC" | version (1 byte) | 2 zero bytes | key fingerprint (8 bytes) | nonce (12 bytes)
    | 4 zero bytes                                                       (32 bytes in all)

The header is authenticated (GCM associated data) together with any caller-supplied
``associated_data`` (e.g. the cache entry's name, so entries cannot be swapped). The fingerprint
lets a wrong key be told apart from a corrupt file: :class:`WrongKeyError` versus
:class:`TamperedDataError`. Keys are 32 random bytes; :class:`EncryptionKey` never shows its
bytes in ``repr`` or logs, only its fingerprint.

Example:
    >>> key = EncryptionKey.generate()
    >>> blob = encrypt(b"voxels", key)
    >>> decrypt(blob, key)
    b'voxels'
    >>> key = load_key(None)  # from the FEDMED_CACHE_KEY environment variable, or None

A site's disk cache holds its preprocessed patient images: :func:`check_cache_at_rest` refuses
to write it in the clear unless the site config accepts that (``plaintext-cache = true``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedmed.errors import ConfigError, SecurityError

__all__ = [
    "KEY_ENV_VAR",
    "PLAINTEXT_CACHE",
    "EncryptionKey",
    "TamperedDataError",
    "WrongKeyError",
    "check_cache_at_rest",
    "decrypt",
    "encrypt",
    "is_encrypted",
    "load_key",
]

KEY_ENV_VAR = "FEDMED_CACHE_KEY"
PLAINTEXT_CACHE = "plaintext-cache"  # the site setting that accepts a disk cache in the clear
_MAGIC = b"FMENC"
_VERSION = 1
_FINGERPRINT_BYTES = 8
_NONCE_BYTES = 12
# 32 bytes (zero padding after the version and the nonce): the plaintext of a blob read into
# a buffer then starts 32-byte aligned, so tensors viewing it stay aligned (fast kernels).
_HEADER = struct.Struct(f"<5sBxx{_FINGERPRINT_BYTES}s{_NONCE_BYTES}s4x")
_KEY_BYTES = 32
_TAG_BYTES = 16


class WrongKeyError(SecurityError):
    """The data was sealed with a different key (fingerprints differ)."""

    exit_code = 7


class TamperedDataError(SecurityError):
    """The sealed data is truncated, corrupt or altered (header or authentication tag fails)."""

    exit_code = 7


@dataclass(frozen=True)
class EncryptionKey:
    """A 256-bit AES key; ``repr`` and ``str`` show only the fingerprint, never the key.

    Example:
        >>> key = EncryptionKey.generate()
        >>> text = key.to_text()  # base64, for a site config or FEDMED_CACHE_KEY
        >>> EncryptionKey.from_text(text) == key
        True
    """

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != _KEY_BYTES:
            size = len(self.secret) if isinstance(self.secret, (bytes, bytearray)) else "?"
            raise SecurityError(
                f"an encryption key must be {_KEY_BYTES} bytes (AES-256), got {size}; "
                "generate one with EncryptionKey.generate().to_text()"
            )

    @classmethod
    def generate(cls) -> EncryptionKey:
        """A fresh random key from the OS's CSPRNG."""
        return cls(secrets.token_bytes(_KEY_BYTES))

    @classmethod
    def from_text(cls, text: str) -> EncryptionKey:
        """Parse a key written as 64 hex digits or as base64 (standard or URL-safe)."""
        text = text.strip()
        try:
            if len(text) == 2 * _KEY_BYTES:
                return cls(bytes.fromhex(text))
            return cls(base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True))
        except (ValueError, binascii.Error) as err:
            raise SecurityError(
                f"the encryption key is neither {2 * _KEY_BYTES} hex digits nor base64 of "
                f"{_KEY_BYTES} bytes; generate one with EncryptionKey.generate().to_text()"
            ) from err

    def to_text(self) -> str:
        """The key as base64 text (store it in a secret store, never in the repository)."""
        return base64.b64encode(self.secret).decode("ascii")

    @property
    def fingerprint(self) -> str:
        """16 hex digits that identify the key without revealing it."""
        return self._fingerprint_bytes().hex()

    def _fingerprint_bytes(self) -> bytes:
        return hashlib.sha256(b"fedmed-key-fingerprint/1" + self.secret).digest()[
            :_FINGERPRINT_BYTES
        ]

    def __str__(self) -> str:
        return f"EncryptionKey(fingerprint={self.fingerprint})"

    __repr__ = __str__


def load_key(
    value: EncryptionKey | bytes | str | None, *, env_var: str = KEY_ENV_VAR
) -> EncryptionKey | None:
    """The key from ``value`` (key, raw 32 bytes, hex or base64 text), else from ``env_var``.

    Returns ``None`` when neither is set (no encryption).
    """
    if value is None:
        value = os.environ.get(env_var) or None
        if value is None:
            return None
    if isinstance(value, EncryptionKey):
        return value
    if isinstance(value, (bytes, bytearray)):
        return EncryptionKey(bytes(value))
    if isinstance(value, str):
        return EncryptionKey.from_text(value)
    raise SecurityError(
        f"an encryption key must be bytes or text, got {type(value).__name__}; "
        "generate one with EncryptionKey.generate().to_text()"
    )


def check_cache_at_rest(
    cache_mode: str,
    *,
    plaintext_cache: bool,
    source: str,
    opt_in: str = f"set {PLAINTEXT_CACHE} = true in the site config",
) -> EncryptionKey | None:
    """The key that seals a site's disk cache (from ``FEDMED_CACHE_KEY``), or ``None``.

    A ``disk`` cache holds the site's preprocessed patient images; without a key they would be
    written in the clear, which the site must accept in its config (``plaintext-cache = true``).
    A cache in memory (or none) needs neither. ``source`` names the config in the message,
    ``opt_in`` how to accept a plaintext cache there.

    Raises:
        ConfigError: a disk cache, no key and no ``plaintext-cache = true``.
        SecurityError: ``FEDMED_CACHE_KEY`` is not a valid key.

    Example:
        >>> check_cache_at_rest("memory", plaintext_cache=False, source="site config A.toml")
    """
    if not cache_mode.startswith("disk"):
        return None
    try:
        key = load_key(None)
    except SecurityError as err:
        raise SecurityError(f"{source}: {KEY_ENV_VAR} is not a valid key: {err}") from err
    if key is None and not plaintext_cache:
        raise ConfigError(
            f"{source}: cache-mode = {cache_mode!r} would write the site's patient images to "
            f"disk unencrypted, and {KEY_ENV_VAR} is not set: set {KEY_ENV_VAR} (32 bytes as "
            "hex or base64, e.g. from `openssl rand -base64 32`; keep it out of the config) to "
            f"encrypt the cache, or {opt_in} to accept a plaintext cache (or use cache-mode = "
            "'memory')"
        )
    return key


def is_encrypted(blob: bytes | bytearray | memoryview) -> bool:
    """True when ``blob`` starts with the fedmed encryption magic."""
    return bytes(blob[: len(_MAGIC)]) == _MAGIC


def encrypt(plaintext: bytes, key: EncryptionKey, *, associated_data: bytes = b"") -> bytes:
    """Seal ``plaintext`` with a fresh random 96-bit nonce; see the module doc for the layout."""
    nonce = secrets.token_bytes(_NONCE_BYTES)
    header = _HEADER.pack(_MAGIC, _VERSION, key._fingerprint_bytes(), nonce)
    return header + AESGCM(key.secret).encrypt(nonce, plaintext, header + associated_data)


def decrypt(
    blob: bytes | bytearray | memoryview,
    key: EncryptionKey,
    *,
    associated_data: bytes = b"",
    name: str = "data",
    in_place: bool = False,
) -> bytearray | memoryview:
    """Open a blob sealed by :func:`encrypt`; returns a writable buffer.

    With ``in_place`` and a writable ``blob`` (a ``bytearray`` read from a file), the plaintext
    overwrites the ciphertext and a view of it is returned: no allocation, no copy.
    Raises :class:`WrongKeyError` when it was sealed with another key and
    :class:`TamperedDataError` when it is truncated or altered; ``name`` goes into messages.
    """
    view = memoryview(blob)
    if len(view) < _HEADER.size + _TAG_BYTES or not is_encrypted(view):
        raise TamperedDataError(f"{name} is not fedmed-encrypted data or is truncated")
    _, version, fingerprint, nonce = _HEADER.unpack_from(view)
    if version != _VERSION:
        raise TamperedDataError(f"{name} has encryption format version {version}, expected 1")
    if fingerprint != key._fingerprint_bytes():
        raise WrongKeyError(
            f"{name} was encrypted with a different key (fingerprint {fingerprint.hex()}, "
            f"the key set now has {key.fingerprint})"
        )
    header = bytes(view[: _HEADER.size])
    sealed = view[_HEADER.size :]
    if in_place and not view.readonly:
        plaintext: bytearray | memoryview = sealed[: len(sealed) - _TAG_BYTES]
    else:
        plaintext = bytearray(len(sealed) - _TAG_BYTES)
    try:
        AESGCM(key.secret).decrypt_into(nonce, sealed, header + associated_data, plaintext)
    except InvalidTag as err:
        raise TamperedDataError(
            f"{name} failed its authentication check (corrupt or altered)"
        ) from err
    return plaintext
