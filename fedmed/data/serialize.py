"""Pickle-free (de)serialization of data items: safetensors for arrays, JSON for the rest.

A data item is a nested structure of dicts (string keys), lists, tuples, ``torch.Tensor``,
``numpy.ndarray``, ``str``, ``int``, ``float``, ``bool``, ``None`` and ``pathlib.Path``.
:func:`dumps` flattens every tensor and array into one safetensors blob under ``"a/b/c"``
keys (the path to it in the item) and stores the remaining tree as JSON in the safetensors
metadata, so :func:`loads` never runs code from the file (unlike pickle). :func:`loads` parses
the safetensors layout itself (8-byte header length, JSON header, raw data) so that tensors can
be views of a writable buffer: a cache entry costs one read and no further copy.

Example:
    >>> blob = dumps({"image": torch.zeros(1, 4, 4), "image_meta": {"spacing": [1.0, 1.0]}})
    >>> loads(blob)["image"].shape
    torch.Size([1, 4, 4])
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

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


def loads(blob: bytes | bytearray | memoryview) -> Any:
    """Rebuild an item written by :func:`dumps`; raises :class:`SerializationError` if malformed.

    A writable buffer (``bytearray``) is used in place: the tensors are views of it, so a cache
    entry is read with one copy (file -> buffer). A ``bytes`` blob is copied once.
    """
    buffer = memoryview(blob)
    if buffer.readonly:
        buffer = memoryview(bytearray(buffer))
    header, data_start = _read_header(buffer)
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or "tree" not in metadata:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise SerializationError(f"not a {FORMAT} blob (metadata format {found!r})")
    try:
        tree = json.loads(metadata["tree"])
    except json.JSONDecodeError as err:
        raise SerializationError(f"unreadable item tree: {err}") from err
    tensors = {name: _view(buffer, data_start, name, info) for name, info in header.items()}
    return _decode(tree, tensors)


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}


def _read_header(buffer: memoryview) -> tuple[dict[str, Any], int]:
    # safetensors layout: 8 bytes little-endian header length, the JSON header, then the data.
    if len(buffer) < 8:
        raise SerializationError(
            f"blob of {len(buffer)} bytes is too short for a safetensors header"
        )
    (length,) = struct.unpack("<Q", buffer[:8])
    if length > len(buffer) - 8:
        raise SerializationError(f"header length {length} exceeds the blob ({len(buffer)} bytes)")
    try:
        header = json.loads(bytes(buffer[8 : 8 + length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SerializationError(f"unreadable safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise SerializationError("safetensors header is not a JSON object")
    return header, 8 + length


def _view(buffer: memoryview, data_start: int, name: str, info: Any) -> torch.Tensor:
    try:
        dtype = _DTYPES[info["dtype"]]
        shape = [int(n) for n in info["shape"]]
        begin, end = (data_start + int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as err:
        raise SerializationError(f"tensor {name!r} has a malformed header entry") from err
    count = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end > len(buffer) or end - begin != count * itemsize or begin < data_start:
        raise SerializationError(
            f"tensor {name!r} needs bytes {begin}..{end} but the blob has {len(buffer)} "
            "(truncated?)"
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=begin).reshape(shape)


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
