"""Array files at rest: safetensors, sealed with AES-256-GCM when a key is configured.

Checkpoints (``weights.safetensors``, ``server_state.safetensors``) are written through
:func:`write_arrays` and read through :func:`read_arrays`. With a key, the file holds
:func:`fedmed.security.encryption.encrypt` of the safetensors bytes, bound to the file's name
(so two sealed files cannot be swapped unnoticed); without one, plain safetensors. Reading
tells the two apart by the magic bytes, so a run may switch encryption on between restarts,
but a sealed file without the key is a clear SecurityError.

The server's key comes from ``FEDMED_CHECKPOINT_KEY`` (64 hex digits or base64 of 32 bytes;
``fedmed.security.encryption.EncryptionKey.generate().to_text()`` makes one). Hashes in
``meta.json`` and signatures cover the file as stored (ciphertext when sealed), so
``fedmed verify`` needs no key.

Example:
    >>> key = EncryptionKey.generate()
    >>> write_arrays(Path("w.safetensors"), {"w": np.zeros(2, np.float32)}, key=key)
    >>> read_arrays(Path("w.safetensors"), key=key)["w"].shape
    (2,)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load, save

from fedmed.errors import SecurityError

from .encryption import EncryptionKey, decrypt, encrypt, is_encrypted, load_key

__all__ = ["CHECKPOINT_KEY_ENV_VAR", "checkpoint_key", "read_arrays", "write_arrays"]

CHECKPOINT_KEY_ENV_VAR = "FEDMED_CHECKPOINT_KEY"


def checkpoint_key() -> EncryptionKey | None:
    """The checkpoint key from ``FEDMED_CHECKPOINT_KEY``, or None (plain files)."""
    return load_key(None, env_var=CHECKPOINT_KEY_ENV_VAR)


def write_arrays(
    path: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray],
    *,
    key: EncryptionKey | None,
) -> None:
    """Write ``arrays`` as safetensors to ``path`` (sealed with ``key`` if given), atomically."""
    path = Path(path)
    blob = save({k: np.require(v, requirements="C") for k, v in arrays.items()})
    if key is not None:
        blob = encrypt(blob, key, associated_data=path.name.encode())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_arrays(
    path: str | os.PathLike[str], *, key: EncryptionKey | None
) -> dict[str, np.ndarray]:
    """Read a file written by :func:`write_arrays`; SecurityError when sealed and no key."""
    path = Path(path)
    blob = bytearray(path.read_bytes())
    if is_encrypted(blob):
        if key is None:
            raise SecurityError(
                f"{path} is encrypted: set {CHECKPOINT_KEY_ENV_VAR} to the key it was written with"
            )
        plain = decrypt(blob, key, associated_data=path.name.encode(), name=str(path))
        return load(bytes(plain))
    return load(bytes(blob))
