"""Model checkpoints without pickle: safetensors with a JSON metadata block, written atomically.

``save_checkpoint`` stores a state_dict's tensors as safetensors and the metadata as JSON in
the safetensors header, so weights and what describes them (``fedmed train``'s model options
and :class:`~fedmed.plan.PreprocessingPlan`, a round number, a Dice) are one file. The file is
written under a temporary name and renamed: a crash never leaves half a checkpoint.
``load_checkpoint`` reads it back; no pickle is ever read or written.

Example:
    >>> save_checkpoint("ckpt.safetensors", model, {"round": 3, **plan.to_metadata()})
    >>> state, meta = load_checkpoint("ckpt.safetensors")
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from fedmed.errors import ModelError

__all__ = ["LoadedCheckpoint", "load_checkpoint", "save_checkpoint"]

_METADATA_KEY = "fedmed"


class LoadedCheckpoint(NamedTuple):
    """A checkpoint's tensors (on CPU) and its JSON metadata."""

    state_dict: dict[str, Tensor]
    metadata: dict[str, Any]


def save_checkpoint(
    path: str | Path,
    model: nn.Module | Mapping[str, Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s state_dict (or a state_dict) and JSON ``metadata`` as safetensors.

    The file is written to a temporary name and renamed, so a crash never leaves half a
    checkpoint. ``metadata`` must be JSON-serialisable.
    """
    path = Path(path)
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    try:
        meta_json = json.dumps(dict(metadata or {}), sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise ModelError(
            f"checkpoint metadata for {path} is not JSON-serialisable ({err}): "
            "use numbers, strings, lists and dicts"
        ) from err
    # clone(): safetensors refuses tensors sharing storage (tied weights, views).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_METADATA_KEY: meta_json})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint written by ``save_checkpoint``; ``ModelError`` names a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist: check the path")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(
            f"checkpoint {path} is not a readable safetensors file ({err}): "
            "re-save it with fedmed, or restore it from a backup"
        ) from err
    if _METADATA_KEY not in header:
        raise ModelError(f"checkpoint {path} has no fedmed metadata: save it with save_checkpoint")
    try:
        metadata = json.loads(header[_METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ModelError(f"checkpoint {path} has corrupt metadata JSON: {err}") from err
    return LoadedCheckpoint(state, metadata)
