"""PKI for the federation, encryption at rest, and integrity of checkpoints."""

from fedmed.security.encryption import (
    EncryptionKey,
    TamperedDataError,
    WrongKeyError,
    decrypt,
    encrypt,
    load_key,
)

__all__ = ["EncryptionKey", "TamperedDataError", "WrongKeyError", "decrypt", "encrypt", "load_key"]
