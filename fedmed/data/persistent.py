"""PersistentDataset: the deterministic prefix cached on disk, keyed on content, no pickle.

Each item's prefix output is stored as one file in ``cache_dir`` named by its cache key:

* the key is sha256 over the item with every existing file replaced by the sha256 of its
  *content* (and its path, which ends up in the meta), plus the sha256 of the prefix's config
  JSON. An overwritten scan or a changed transform parameter gives a new key, never stale data
  (MONAI keys on the path string only).
* entries are safetensors with the non-tensor tree as JSON metadata (:mod:`fedmed.data.serialize`),
  optionally sealed with AES-256-GCM (:mod:`fedmed.security.encryption`); nothing is unpickled.
* writes are atomic (temporary file in the same folder, then ``os.replace``); a corrupt entry
  (truncated, bad header, failed authentication) is logged as a warning, deleted and rebuilt.
* an entry sealed with another key raises :class:`~fedmed.errors.SecurityError` instead of
  being rebuilt over and over.

Content hashes are memoised within the process by ``(path, device, inode, size, mtime_ns,
ctime_ns)``: any rewrite changes ``ctime``, even one that restores the old ``mtime``.

Example:
    >>> dataset = PersistentDataset(cases, pipeline, "/data/site-cache", encryption_key=key)
    >>> dataset.prepare(num_workers=4)  # optional: build every entry up front
    >>> sample = dataset[0]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedmed.data.prefix import apply_rest, prefix_digest, rest_is_safe, split_transform
from fedmed.data.serialize import SerializationError, dumps, loads
from fedmed.errors import DataError, SecurityError
from fedmed.security.encryption import (
    EncryptionKey,
    TamperedDataError,
    WrongKeyError,
    decrypt,
    encrypt,
    load_key,
)
from fedmed.transforms.base import Compose

__all__ = ["PersistentDataset", "file_digest"]

logger = logging.getLogger(__name__)

_PLAIN_SUFFIX = ".safetensors"
_SEALED_SUFFIX = ".safetensors.enc"
_CHUNK = 1 << 20
_digest_memo: dict[tuple[Any, ...], str] = {}
_memo_lock = threading.Lock()


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's content, streamed; memoised on its identity and times."""
    path = Path(path)
    stat = path.stat()
    identity = (
        str(path.resolve()),
        stat.st_dev,
        stat.st_ino,
        stat.st_size,
        stat.st_mtime_ns,
        stat.st_ctime_ns,
    )
    with _memo_lock:
        cached = _digest_memo.get(identity)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with _memo_lock:
        _digest_memo[identity] = value
    return value


class PersistentDataset:
    """Cache the deterministic prefix of ``transform`` on disk; run the rest on every access.

    Args:
        data: the data items (dicts of file paths and values).
        transform: a Compose or sequence of callables (as for
            :class:`~fedmed.data.cache.CacheDataset`).
        cache_dir: the cache folder (created if missing); it holds patient data, keep it on the
            site and set ``encryption_key``.
        encryption_key: an :class:`~fedmed.security.encryption.EncryptionKey`, 32 raw bytes, or
            hex/base64 text; ``None`` reads ``FEDMED_CACHE_KEY`` from the environment, and
            without it entries are stored in the clear.
        keep_in_memory: also keep each entry in RAM once read (decrypted), so a restarted
            site loads the prefix from disk once (:meth:`prepare`) and then trains at
            :class:`~fedmed.data.cache.CacheDataset` speed; the source files are not
            re-checked while it runs.

    Example:
        >>> dataset = PersistentDataset(cases, pipeline, tmp_path / "cache")
        >>> dataset[0]["image"].shape
        torch.Size([1, 96, 96, 64])
    """

    def __init__(
        self,
        data: Sequence[dict[str, Any]],
        transform: Compose | Sequence[Callable[[Any], Any]] | None,
        cache_dir: str | Path,
        *,
        encryption_key: EncryptionKey | bytes | str | None = None,
        keep_in_memory: bool = False,
    ) -> None:
        self.data = list(data)
        self.keep_in_memory = keep_in_memory
        self._memory: dict[int, Any] = {}
        self.prefix, self.rest = split_transform(transform)
        self._safe_rest = rest_is_safe(self.rest)
        self._prefix_digest = prefix_digest(self.prefix)
        self.cache_dir = Path(cache_dir)
        self._key = load_key(encryption_key)
        self._suffix = _SEALED_SUFFIX if self._key is not None else _PLAIN_SUFFIX
        self._check_writable()

    @property
    def encrypted(self) -> bool:
        """True when entries are sealed with AES-256-GCM."""
        return self._key is not None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return apply_rest(self.rest, self.cached_item(index), safe=self._safe_rest)

    def cache_key(self, index: int) -> str:
        """The item's cache key: hash of its content and of the prefix config."""
        item = self.data[index]
        described = json.dumps(
            {"item": _describe(item), "prefix": self._prefix_digest},
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        return hashlib.sha256(described.encode()).hexdigest()

    def entry_path(self, index: int) -> Path:
        """Where item ``index``'s entry lives (whether or not it exists yet)."""
        return self.cache_dir / f"{self.cache_key(index)}{self._suffix}"

    def cached_item(self, index: int) -> Any:
        """The prefix output for item ``index``: read from the cache, or built and stored."""
        if index < 0:
            index += len(self.data)
        if self.keep_in_memory and index in self._memory:
            return self._memory[index]
        item = self._load_or_build(index)
        if self.keep_in_memory:
            self._memory[index] = item
        return item

    def _load_or_build(self, index: int) -> Any:
        key = self.cache_key(index)
        path = self.cache_dir / f"{key}{self._suffix}"
        item = self._read(path, key)
        if item is not None:
            return item
        item = self.prefix(self.data[index])
        self._write(path, key, item)
        return item

    def prepare(self, *, num_workers: int = 1, progress: bool = True) -> None:
        """Build every missing entry now (and load all into RAM with ``keep_in_memory``)."""
        bar = tqdm(
            total=len(self.data), desc="caching", unit="item", disable=not progress, leave=False
        )
        with (
            bar,
            ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="fedmed-pcache") as pool,
        ):
            for _ in pool.map(self.cached_item, range(len(self.data))):
                bar.update()

    def _check_writable(self) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.cache_dir):
                pass
        except OSError as err:
            raise DataError(
                f"cache folder {self.cache_dir} is not writable ({err.strerror or err}); "
                "choose a folder this user can write, or fix its permissions"
            ) from err
        if self._key is None and any(self.cache_dir.glob(f"*{_SEALED_SUFFIX}")):
            logger.warning(
                "cache folder %s holds encrypted entries but no encryption key is set; "
                "they are ignored and plaintext entries are written",
                self.cache_dir,
            )

    def _read(self, path: Path, key: str) -> Any | None:
        try:
            blob = _read_into_buffer(path)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise DataError(f"cache entry {path} cannot be read ({err.strerror or err})") from err
        try:
            if self._key is not None:
                blob = decrypt(
                    blob,
                    self._key,
                    associated_data=key.encode(),
                    name=f"cache entry {path}",
                    in_place=True,
                )
            return loads(blob)
        except WrongKeyError as err:
            raise SecurityError(
                f"{err}; set the site's cache key (encryption_key or FEDMED_CACHE_KEY) to the "
                f"one used before, or clear the cache folder {self.cache_dir}"
            ) from err
        except (TamperedDataError, SerializationError) as err:
            logger.warning("cache entry %s is corrupt (%s); deleting and rebuilding it", path, err)
            path.unlink(missing_ok=True)
            return None

    def _write(self, path: Path, key: str, item: Any) -> None:
        blob = dumps(item)
        if self._key is not None:
            blob = encrypt(blob, self._key, associated_data=key.encode())
        handle, tmp_name = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as tmp:
                tmp.write(blob)
            os.replace(tmp_name, path)
        except OSError as err:
            Path(tmp_name).unlink(missing_ok=True)
            raise DataError(
                f"cannot write cache entry {path} ({err.strerror or err}); check free space "
                f"and permissions of {self.cache_dir}"
            ) from err
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def _read_into_buffer(path: Path) -> bytearray:
    # A writable buffer lets loads() return tensors that are views of it (one copy in all).
    with path.open("rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        buffer = bytearray(size)
        view = memoryview(buffer)
        read = 0
        while read < size:
            count = handle.readinto(view[read:])
            if not count:
                break
            read += count
    return buffer if read == size else buffer[:read]


def _describe(value: Any) -> Any:
    """The item as JSON-able data with each existing file replaced by its content hash."""
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, (str, Path)) and str(value) and os.path.isfile(value):
        return {"file": str(value), "sha256": file_digest(value)}
    if isinstance(value, Path):
        return str(value)
    return value
