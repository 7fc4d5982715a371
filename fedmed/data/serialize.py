"""Pickle-free (de)serialization of data items: safetensors for arrays, JSON for the rest.

A data item is a nested structure of dicts (string keys), lists, tuples, ``torch.Tensor``,
``numpy.ndarray``, ``str``, ``int``, ``float``, ``bool``, ``None`` and ``pathlib.Path``.
:func:`dumps` flattens every tensor and array into one safetensors blob under ``"a/b/c"``
keys (the path to it in the item) and stores the remaining tree as JSON in the safetensors
metadata, so :func:`loads` never runs code from the file (unlike pickle).

Example:
    >>> blob = dumps({"image": torch.zeros(1, 4, 4), "image_meta": {"spacing": [1.0, 1.0]}})
    >>> loads(blob)["image"].shape
    torch.Size([1, 4, 4])
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

__all__ = ["FORMAT", "SerializationError", "dumps", "loads"]

FORMAT = "fedmed-item/1"
_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__path__")


class SerializationError(ValueError):
    """The item holds a type that cannot be stored without pickle, or a blob is malformed."""


def dumps(item: Any) -> bytes:
    """Serialize ``item`` to bytes (safetensors with the non-array tree in its metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(item, "", tensors)
    metadata = {"format": FORMAT, "tree": json.dumps(tree, allow_nan=True)}
    return safetensors.torch.save(tensors, metadata=metadata)


def loads(blob: bytes) -> Any:
    """Rebuild an item written by :func:`dumps`; raises :class:`SerializationError` if malformed."""
    metadata = _read_metadata(blob)
    if metadata.get("format") != FORMAT or "tree" not in metadata:
        raise SerializationError(
            f"not a {FORMAT} blob (metadata format {metadata.get('format')!r})"
        )
    try:
        tree = json.loads(metadata["tree"])
        tensors = safetensors.torch.load(blob)
    except (ValueError, SafetensorError) as err:
        raise SerializationError(f"malformed blob: {err}") from err
    return _decode(tree, tensors)


def _read_metadata(blob: bytes) -> dict[str, str]:
    # safetensors.torch.load() drops the metadata, so read the header ourselves:
    # 8 bytes little-endian header length, then the JSON header.
    if len(blob) < 8:
        raise SerializationError(f"blob of {len(blob)} bytes is too short for a safetensors header")
    (length,) = struct.unpack("<Q", blob[:8])
    if length > len(blob) - 8:
        raise SerializationError(f"header length {length} exceeds the blob ({len(blob)} bytes)")
    try:
        header = json.loads(blob[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SerializationError(f"unreadable safetensors header: {err}") from err
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise SerializationError("safetensors header has no metadata")
    return metadata


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return {"__tensor__": _store(_standalone(value.detach().cpu()), path, tensors)}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise SerializationError(f"{path or 'item'}: object arrays cannot be stored")
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": _store(_standalone(tensor), path, tensors)}
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            if not isinstance(key, str):
                raise SerializationError(f"{path or 'item'}: dict key {key!r} is not a string")
            if key in _TAGS:
                raise SerializationError(f"{path or 'item'}: dict key {key!r} is reserved")
            out[key] = _encode(sub, f"{path}/{key}" if path else key, tensors)
        return out
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}" if path else str(i), tensors) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        items = [
            _encode(v, f"{path}/{i}" if path else str(i), tensors) for i, v in enumerate(value)
        ]
        return {"__tuple__": items}
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    raise SerializationError(
        f"{path or 'item'}: values of type {type(value).__name__} cannot be cached "
        "(allowed: tensors, numpy arrays, dict, list, tuple, str, int, float, bool, None, Path)"
    )


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    # safetensors refuses views that share storage with other stored tensors.
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def _store(tensor: torch.Tensor, path: str, tensors: dict[str, torch.Tensor]) -> str:
    key = path or "item"
    while key in tensors:  # "a/1" from a dict key and from a list index
        key += "'"
    tensors[key] = tensor
    return key


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        (tag, value), *_ = node.items()
        if tag == "__tensor__":
            return _tensor(value, tensors)
        if tag == "__ndarray__":
            return _tensor(value, tensors).numpy()
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__path__":
            return Path(value)
    return {key: _decode(value, tensors) for key, value in node.items()}


def _tensor(key: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    try:
        return tensors[key]
    except KeyError as err:
        raise SerializationError(f"blob names tensor {key!r} but does not hold it") from err
