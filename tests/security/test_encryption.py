"""AES-256-GCM at rest: round trip, wrong key vs tampering, key parsing, no key leaks."""

from __future__ import annotations

import logging

import pytest

from fedmed.errors import ConfigError, SecurityError
from fedmed.security.encryption import (
    EncryptionKey,
    TamperedDataError,
    WrongKeyError,
    check_cache_at_rest,
    decrypt,
    encrypt,
    is_encrypted,
    load_key,
)


@pytest.fixture(scope="module")
def key() -> EncryptionKey:
    return EncryptionKey.generate()


def test_round_trip_restores_plaintext_and_hides_it(key: EncryptionKey) -> None:
    plaintext = b"voxel data " * 100
    blob = encrypt(plaintext, key, associated_data=b"entry-1")
    assert is_encrypted(blob)
    assert plaintext[:32] not in blob
    assert decrypt(blob, key, associated_data=b"entry-1") == plaintext


def test_each_seal_uses_a_fresh_nonce(key: EncryptionKey) -> None:
    assert encrypt(b"same", key) != encrypt(b"same", key)


def test_wrong_key_is_reported_with_fingerprint_not_as_corruption(key: EncryptionKey) -> None:
    other = EncryptionKey.generate()
    blob = encrypt(b"secret", key)
    with pytest.raises(WrongKeyError, match=f"fingerprint {key.fingerprint}.*{other.fingerprint}"):
        decrypt(blob, other, name="cache entry x")


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1],
        lambda b: b[:10],
        lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:],
        lambda b: b"XXXXX" + b[5:],
    ],
    ids=["truncated-tag", "truncated-header", "flipped-bit", "bad-magic"],
)
def test_damaged_blob_raises_tampered_data_error(key: EncryptionKey, damage) -> None:
    with pytest.raises(TamperedDataError, match="cache entry e1"):
        decrypt(damage(encrypt(b"payload" * 10, key)), key, name="cache entry e1")


def test_associated_data_binds_blob_to_its_name(key: EncryptionKey) -> None:
    blob = encrypt(b"payload", key, associated_data=b"entry-a")
    with pytest.raises(TamperedDataError, match="authentication"):
        decrypt(blob, key, associated_data=b"entry-b")


def test_key_parses_from_hex_base64_urlsafe_and_bytes(key: EncryptionKey) -> None:
    urlsafe = key.to_text().replace("+", "-").replace("/", "_")
    for value in (key.secret.hex(), key.to_text(), urlsafe, key.secret, key):
        assert load_key(value) == key


def test_key_comes_from_environment_when_not_given(
    key: EncryptionKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDMED_CACHE_KEY", raising=False)
    assert load_key(None) is None
    monkeypatch.setenv("FEDMED_CACHE_KEY", key.to_text())
    assert load_key(None) == key


def test_a_disk_cache_needs_the_key_or_the_sites_consent(
    key: EncryptionKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.delenv("FEDMED_CACHE_KEY", raising=False)
    source = "site config /etc/fedmed/A.toml"
    # Execute / Assert: memory and none need neither; disk needs one of them
    for mode in ("memory", "none"):
        assert check_cache_at_rest(mode, plaintext_cache=False, source=source) is None
    with pytest.raises(
        ConfigError,
        match=r"^site config /etc/fedmed/A.toml: cache-mode = 'disk' would write .* unencrypted"
        r".*set FEDMED_CACHE_KEY .* or set plaintext-cache = true in the site config",
    ):
        check_cache_at_rest("disk", plaintext_cache=False, source=source)
    assert check_cache_at_rest("disk", plaintext_cache=True, source=source) is None
    monkeypatch.setenv("FEDMED_CACHE_KEY", key.to_text())
    assert check_cache_at_rest("disk", plaintext_cache=False, source=source) == key
    monkeypatch.setenv("FEDMED_CACHE_KEY", "not a key")
    with pytest.raises(
        SecurityError, match=rf"^{source}: FEDMED_CACHE_KEY is not a valid key: .* neither 64 hex"
    ):
        check_cache_at_rest("disk", plaintext_cache=True, source=source)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("not a key", "neither 64 hex digits nor base64"),
        (b"short", r"must be 32 bytes \(AES-256\), got 5"),
    ],
    ids=["text", "bytes"],
)
def test_bad_key_raises_security_error(value: str | bytes, match: str) -> None:
    with pytest.raises(SecurityError, match=match):
        load_key(value)


def test_key_never_appears_in_repr_or_logs(
    key: EncryptionKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("test").info("using %s / %r", key, key)
    text = caplog.text + repr(key) + str(key)
    assert key.fingerprint in text
    assert key.to_text() not in text and key.secret.hex() not in text


def test_in_place_decryption_reuses_the_buffer(key: EncryptionKey) -> None:
    buffer = bytearray(encrypt(b"voxels" * 1000, key))
    plaintext = decrypt(buffer, key, in_place=True)
    assert bytes(plaintext) == b"voxels" * 1000
    assert isinstance(plaintext, memoryview) and plaintext.obj is buffer


def test_in_place_decryption_of_altered_data_raises(key: EncryptionKey) -> None:
    buffer = bytearray(encrypt(b"voxels" * 1000, key))
    buffer[40] ^= 1
    with pytest.raises(TamperedDataError, match="authentication"):
        decrypt(buffer, key, in_place=True)
