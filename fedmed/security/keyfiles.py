"""Writing keys and certificates without following symlinks, private keys 0600 from the start.

A key written with a plain ``open(path, "w")`` follows a symbolic link at ``path``, also a
dangling one, so whoever can plant a link in the folder decides where a private key lands.
:func:`write_key_file` never follows one: a new file is created with ``O_CREAT | O_EXCL |
O_NOFOLLOW`` (fails on any existing name, a link included); a replacement is written to a fresh
temporary file in the same folder and renamed over the old name (``rename`` replaces a link
itself, never its target), and a link found at the name is refused either way. The mode is set
on the open file descriptor, before any byte is written, so no umask or ``chmod`` window leaves
a private key readable.

Example:
    >>> write_key_file(Path("certs/server.key"), pem, private=True)
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from fedmed.errors import SecurityError

__all__ = ["PRIVATE_MODE", "PUBLIC_MODE", "check_target", "make_private_dir", "write_key_file"]

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def check_target(path: Path, *, replace: bool) -> bool:
    """Whether ``path`` exists; SecurityError when it is a symlink (dangling or not) or not a
    regular file, or when it exists and ``replace`` is false."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode):
        raise SecurityError(
            f"{path} is a symbolic link (to {os.readlink(path)}): refusing to write a key or "
            "certificate through it; remove the link and run the command again"
        )
    if not stat.S_ISREG(info.st_mode):
        raise SecurityError(f"{path} exists and is not a regular file: move it away")
    if not replace:
        raise SecurityError(f"{path} already exists: refusing to overwrite it")
    return True


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 when missing; SecurityError when it is a
    symlink or not a folder."""
    if path.is_symlink():
        raise SecurityError(f"{path} is a symbolic link: give a real folder for private keys")
    if path.exists() and not path.is_dir():
        raise SecurityError(f"{path} exists and is not a folder")
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    return path


def write_key_file(path: Path, data: bytes, *, private: bool, replace: bool = False) -> Path:
    """Write ``data`` to ``path`` (0600 when ``private``, else 0644) without following a link.

    Raises:
        SecurityError: ``path`` is a symlink, not a regular file, or exists and ``replace`` is
            false.
    """
    mode = PRIVATE_MODE if private else PUBLIC_MODE
    exists = check_target(path, replace=replace)
    if not exists:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        except FileExistsError as err:  # appeared since the check: a link or a racing writer
            raise SecurityError(f"{path} appeared while writing it: refusing to overwrite") from err
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return path
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # O_EXCL|O_NOFOLLOW
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
