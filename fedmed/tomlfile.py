"""The one reader of fedmed's TOML config files and their one error format.

Four files configure fedmed: ``configs/federation.toml`` (:mod:`fedmed.config`),
``configs/sites/X.toml`` (:mod:`fedmed.site_config`), ``configs/sim.toml``
(:mod:`fedmed.simulation.config`) and ``fedmed train --config`` (:mod:`fedmed.cli.train`).
All of them are read by :func:`read_toml` and their tables by :class:`TomlTable`, so every
error is a :class:`~fedmed.errors.ConfigError` worded the same way: the file, then the table
and key, then what is wrong and the fix::

    config file sim.toml does not exist: pass --config PATH
    sim.toml: [sim] sites = 'three' must be int
    sim.toml: [resources] has unknown key(s) gpu: check the spelling (known: cache-mode, ...)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from fedmed.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["TomlTable", "read_toml", "toml_value"]

_MISSING = object()


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML document at ``path``; ConfigError naming the file when it is missing,
    unreadable or not TOML.

    Example:
        >>> read_toml(Path("configs/federation.toml"))["server"]["port"]
        9092
    """
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist: pass --config PATH") from err
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err


class TomlTable:
    """Typed reads from one table of a TOML file, each error naming the file, table and key;
    :meth:`finish` refuses the keys no read asked for (a misspelling is never ignored).

    Example:
        >>> table = TomlTable(Path("sim.toml"), "sim", {"sites": 3})
        >>> table.get("sites", int), table.get("seed", int, 0)
        (3, 0)
        >>> table.finish()
    """

    def __init__(self, path: Path, name: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        self.path, self.name, self.data = path, name, data
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        """``file: [table] key``, the prefix of every error about ``key``."""
        return f"{self.path}: [{self.name}] {key}"

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        """The value of ``key`` if it has type ``kind`` (``float`` also takes an integer);
        ``default`` when absent (no default: the key is required)."""
        self.used.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise ConfigError(f"{self.where(key)} is missing: add it to the file")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and int not in kinds:
            kinds = (*kinds, int)
        # bool is an int subclass: `port = true` must not pass as an integer
        ok = False if isinstance(value, bool) and bool not in kinds else isinstance(value, kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds if k is not int or float not in kinds)
            raise ConfigError(f"{self.where(key)} = {value!r} must be {names}")
        return float(value) if float in kinds and isinstance(value, int) else value

    def positive(self, key: str, kind: type, default: Any = _MISSING, *, zero: bool = False) -> Any:
        """A finite number > 0 (>= 0 with ``zero``)."""
        value = self.get(key, kind, default)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{self.where(key)} = {value!r} must be a finite number")
        if value is not None and (value < 0 or (value == 0 and not zero)):
            bound = ">= 0" if zero else "> 0"
            raise ConfigError(f"{self.where(key)} = {value!r} must be {bound}")
        return value

    def port(self, key: str, default: Any = _MISSING) -> Any:
        """A TCP port, 1..65535."""
        value = self.get(key, int, default)
        if value is not None and not 1 <= value <= 65535:
            raise ConfigError(f"{self.where(key)} = {value!r} must be a port in 1..65535")
        return value

    def path_value(self, key: str, default: Any = _MISSING) -> Path | None:
        """A path, resolved against the config file's folder."""
        value = self.get(key, str, default)
        if value is None:
            return None
        if not value:
            raise ConfigError(f"{self.where(key)} is empty: give a path")
        return (self.path.parent / Path(value).expanduser()).resolve()

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> str:
        """One of ``choices``."""
        value = self.get(key, str, default)
        if value not in choices:
            raise ConfigError(f"{self.where(key)} = {value!r} must be one of {choices}")
        return value

    def finish(self) -> None:
        """Refuse the keys no read asked for."""
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(
                f"{self.path}: [{self.name}] has unknown key(s) {', '.join(unknown)}: "
                f"check the spelling (known: {', '.join(sorted(self.used))})"
            )


def toml_value(text: str) -> Any:
    """A setting's value given on a command line: read as a TOML value (``true``, ``0.5``,
    ``"8,16"``), else the text itself (``dice``).

    Example:
        >>> toml_value("true"), toml_value("0.5"), toml_value("dice")
        (True, 0.5, 'dice')
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
