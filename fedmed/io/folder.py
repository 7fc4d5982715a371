"""A site folder's boundary: paths stay inside it, and its ``dataset.json`` is read defensively.

Whoever fills a site folder chooses what ``dataset.json`` says and where its links point. The
rules:

- a path listed in ``dataset.json`` (relative to the folder) must stay inside the folder once
  normalized: an absolute path elsewhere or a ``..`` that climbs out is refused;
- a symbolic link inside the folder whose target lies outside it is refused, unless the site
  config sets ``allow-external-links = true`` (a site that keeps its scans on another disk);
- ``dataset.json`` must be a regular file (a FIFO would block the reader, ``/dev/zero`` never
  ends) of at most :data:`MAX_DATASET_JSON_BYTES`, valid UTF-8 JSON, an object at the top,
  nested no deeper than :data:`MAX_JSON_DEPTH`.

Each refusal is a :class:`~fedmed.errors.DataError` naming the file, the entry and the fix.

Example:
    >>> folder = SiteFolder(Path("/data/site-A"))
    >>> folder.contained("./imagesTr/p01.nii.gz", where="dataset.json entry 0")
    PosixPath('/data/site-A/imagesTr/p01.nii.gz')
    >>> folder.contained("../../etc/passwd", where="dataset.json entry 1")  # DataError
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedmed.errors import DataError
from fedmed.io.header import regular_file_size
from fedmed.text import printable

__all__ = ["MAX_DATASET_JSON_BYTES", "MAX_JSON_DEPTH", "SiteFolder"]

MAX_DATASET_JSON_BYTES = 16 * 2**20  # room for ~100,000 cases
MAX_JSON_DEPTH = 16  # dataset.json needs 3 levels (object -> "training" list -> entry)


class SiteFolder:
    """The site folder ``root`` (absolute) and the rule for paths in it.

    Example:
        >>> SiteFolder(Path("/data/site-A"), allow_external_links=True).check_link(path)
    """

    def __init__(self, root: Path, *, allow_external_links: bool = False) -> None:
        self.root = Path(root).absolute()
        self.real_root = Path(os.path.realpath(self.root))
        self.allow_external_links = allow_external_links

    def contained(self, listed: str, *, where: str) -> Path:
        """``listed`` (relative to the folder) as an absolute path inside it, or DataError
        naming ``where`` it was listed."""
        path = Path(os.path.normpath(self.root / listed))
        if not path.is_relative_to(self.root):
            raise DataError(
                f"{where}: {printable(listed)} points outside the site folder "
                f"{printable(self.root)}; list files inside it, relative to it "
                "(./imagesTr/x.nii.gz)"
            )
        self.check_link(path)
        return path

    def check_link(self, path: Path) -> None:
        """Refuse ``path`` when symbolic links take it outside the folder (unless allowed)."""
        if self.allow_external_links:
            return
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self.real_root):
            raise DataError(
                f"{printable(path)}: a symbolic link to {printable(real)}, outside the site "
                f"folder {printable(self.root)}; copy the file into the folder, or set "
                "allow-external-links = true in the site config to follow links out of it"
            )

    def read_json(self, name: str) -> dict[str, Any]:
        """The JSON object in file ``name`` of the folder, read within the limits above."""
        path = self.root / name
        shown = printable(path)
        self.check_link(path)
        if regular_file_size(path) > MAX_DATASET_JSON_BYTES:
            raise _too_big(shown)
        try:
            with path.open("rb") as fh:
                data = fh.read(MAX_DATASET_JSON_BYTES + 1)  # the file may have grown since
            if len(data) > MAX_DATASET_JSON_BYTES:
                raise _too_big(shown)
            meta = json.loads(data.decode("utf-8-sig"))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{shown}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
            ) from err
        except RecursionError as err:  # json's decoder nests one Python call per level
            raise _too_deep(shown) from err
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{shown}: cannot read the file ({err})") from err
        if not isinstance(meta, dict):
            raise DataError(f"{shown}: expected a JSON object at the top level")
        if _depth(meta) > MAX_JSON_DEPTH:
            raise _too_deep(shown)
        return meta


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (iterative: no recursion to exhaust)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _too_big(shown: str) -> DataError:
    return DataError(
        f"{shown}: larger than {MAX_DATASET_JSON_BYTES // 2**20} MiB; a dataset.json lists "
        "file paths and class names only: remove anything else from it"
    )


def _too_deep(shown: str) -> DataError:
    return DataError(
        f"{shown}: nested deeper than {MAX_JSON_DEPTH} levels; a dataset.json is an object "
        'with a "training" list of {"image": ..., "label": ...} entries'
    )
