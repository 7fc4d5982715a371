"""Model arrays on the wire: all arrays of a message packed into one Flower ``Array``.

Flower 1.41 ships every ``Array`` of an ``ArrayRecord`` as its own object, and every object is
one HTTP request (plus an SQLite write at the SuperLink) on each hop: server app -> SuperLink ->
SuperNode -> ClientApp and back. A model with 100 tensors costs some 200 requests per site per
hop, each with its own framing and the risk of being pulled before it was pushed (Flower then
backs off for 1 s, 2 s, 4 s ...). fedmed sends the model as:

* ArrayRecord ``arrays`` holding exactly one ``Array`` ``packed``: a flat ``uint8`` array (in
  NumPy's ``.npy`` serialization, so ``Array.numpy()`` still works on it) with the raw C-order
  bytes of every array, each starting at a multiple of :data:`ALIGN` bytes;
* ConfigRecord ``arrays-index``: ``format`` (:data:`FORMAT`), ``keys``, ``dtypes`` (NumPy dtype
  strings with byte order, e.g. ``<f4``), ``ndims`` and ``dims`` (the shapes, flattened),
  ``offsets`` (byte offset of each array in the payload) and ``nbytes`` (payload length).

Both directions use it: the global model the server sends and the arrays a site returns.
:func:`pack_array` / :func:`unpack_array` give the same packing as a plain NumPy array and
index dict, for SecAgg+ rounds (Flower's legacy ``FitIns``). :func:`unpack` checks the index
against the payload (lengths, dtypes, bounds, overlaps, duplicate keys) and raises
:class:`WireError` naming the key and the bad value; the server turns that into a rejected
reply with the reason.

Example:
    >>> records = pack({"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)})
    >>> sorted(records)
    ['arrays', 'arrays-index']
    >>> unpack(records["arrays"], records["arrays-index"])["w"].shape
    (2, 3)
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedmed.errors import FederationError
from fedmed.flower.codes import SType

__all__ = [
    "ALIGN",
    "ARRAYS",
    "FORMAT",
    "INDEX",
    "MODEL_SEPARATOR",
    "PACKED",
    "WireError",
    "join_models",
    "pack",
    "pack_array",
    "split_models",
    "unpack",
    "unpack_array",
    "unpack_content",
]

ARRAYS = "arrays"  # the ArrayRecord's name in a message
INDEX = "arrays-index"  # the ConfigRecord's name in a message
PACKED = "packed"  # the one Array in the ArrayRecord
FORMAT = "fedmed-packed-1"
MODEL_SEPARATOR = "::"  # several models in one message: keys ``<label>::<state_dict key>``
ALIGN = 8  # every array starts at a multiple of this (float64/int64 views stay aligned)
_MAX_NDIM = 32  # numpy allows 64; no model weight comes near
_KINDS = "biufc"  # bool, signed, unsigned, float, complex: plain numbers only
_FIELDS = ("keys", "dtypes", "ndims", "dims", "offsets")


class WireError(FederationError):
    """A packed message does not match its index (or is not a packed message at all)."""

    exit_code = 6


def _npy_header(nbytes: int) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (nbytes,)}
    )
    return header.getvalue()


def _layout(arrays: Mapping[str, np.ndarray]) -> tuple[list[Any], dict[str, Any]]:
    """The payload's parts (raw bytes, padding) and its index; ValueError for a bad dtype."""
    keys, dtypes, ndims, dims, offsets = [], [], [], [], []
    parts: list[Any] = []
    offset = 0
    for key, value in arrays.items():
        array = np.require(value, requirements="C")
        if array.dtype.kind not in _KINDS:
            raise ValueError(
                f"array {key!r} has dtype {array.dtype}: only bool, integer, float and complex "
                "arrays can be sent"
            )
        pad = -offset % ALIGN
        if pad:
            parts.append(bytes(pad))
            offset += pad
        keys.append(str(key))
        dtypes.append(array.dtype.str)
        ndims.append(array.ndim)
        dims.extend(int(d) for d in array.shape)
        offsets.append(offset)
        if array.nbytes:
            parts.append(memoryview(array).cast("B"))
            offset += array.nbytes
    index = {
        "format": FORMAT,
        "keys": keys,
        "dtypes": dtypes,
        "ndims": ndims,
        "dims": dims,
        "offsets": offsets,
        "nbytes": offset,
    }
    return parts, index


def pack(arrays: Mapping[str, np.ndarray]) -> dict[str, ArrayRecord | ConfigRecord]:
    """``{"arrays": ArrayRecord({"packed": Array}), "arrays-index": ConfigRecord}`` for
    ``arrays`` (in their iteration order); ValueError for a non-numeric dtype."""
    parts, index = _layout(arrays)
    data = b"".join([_npy_header(index["nbytes"]), *parts])
    packed = Array(dtype="uint8", shape=(index["nbytes"],), stype=SType.NUMPY, data=data)
    return {ARRAYS: ArrayRecord({PACKED: packed}), INDEX: ConfigRecord(index)}


def pack_array(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, Any]]:
    """The same packing as a flat ``uint8`` NumPy array and its index (a plain dict), for
    transports that carry NumPy arrays, such as Flower's legacy ``FitIns`` (SecAgg+)."""
    parts, index = _layout(arrays)
    return np.frombuffer(bytearray(b"".join(parts)), dtype=np.uint8), index


def _payload(record: ArrayRecord) -> np.ndarray:
    names = list(record.keys())
    if names != [PACKED]:
        raise WireError(
            f"ArrayRecord {ARRAYS!r} must hold exactly one array {PACKED!r} (fedmed's packed "
            f"format), got {_few(names)}: the sender does not speak {FORMAT}"
        )
    array = record[PACKED]
    if array.stype != SType.NUMPY or array.dtype != "uint8" or len(array.shape) != 1:
        raise WireError(
            f"array {PACKED!r} must be a flat uint8 NumPy array, got dtype {array.dtype}, "
            f"shape {tuple(array.shape)}, serialization {array.stype!r}"
        )
    data = array.data if isinstance(array.data, (bytes, bytearray, memoryview)) else b""
    declared = math.prod(int(d) for d in array.shape) if array.shape else 0
    header = len(_npy_header(declared))
    if len(data) != header + declared:  # before NumPy reads a header that may ask for terabytes
        raise WireError(
            f"array {PACKED!r} declares {declared} bytes but carries {max(0, len(data) - header)}"
        )
    try:
        payload = array.numpy()
    except Exception as err:  # whatever NumPy makes of a crafted header
        raise WireError(f"array {PACKED!r} is not a readable .npy payload: {err}") from err
    if payload.dtype != np.uint8 or payload.shape != (declared,):
        raise WireError(f"array {PACKED!r} holds {payload.dtype} {payload.shape}, not its header's")
    return payload


def _index_lists(index: Mapping[str, Any]) -> tuple[list[Any], ...]:
    if index.get("format") != FORMAT:
        raise WireError(
            f"ConfigRecord {INDEX!r} has format {index.get('format')!r}, expected {FORMAT!r}"
        )
    missing = [name for name in (*_FIELDS, "nbytes") if name not in index]
    if missing:
        raise WireError(f"ConfigRecord {INDEX!r} lacks {', '.join(missing)}")
    lists = tuple(index[name] for name in _FIELDS)
    for name, values in zip(_FIELDS, lists, strict=True):
        kind = str if name in ("keys", "dtypes") else int
        if not isinstance(values, list) or not all(
            isinstance(v, kind) and not isinstance(v, bool) for v in values
        ):
            raise WireError(
                f"{INDEX!r} field {name!r} must be a list of {kind.__name__}, got {values!r:.80}"
            )
    if not isinstance(index["nbytes"], int):
        raise WireError(f"{INDEX!r} field 'nbytes' must be an int, got {index['nbytes']!r}")
    keys, dtypes, ndims, _, offsets = lists
    if not len(keys) == len(dtypes) == len(ndims) == len(offsets):
        raise WireError(
            f"{INDEX!r} lists differ in length: {len(keys)} keys, {len(dtypes)} dtypes, "
            f"{len(ndims)} ndims, {len(offsets)} offsets"
        )
    return lists


def unpack(record: ArrayRecord, index: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of a packed ``record`` described by ``index`` (writable, in index order).

    Raises:
        WireError: the record is not fedmed's packed format or does not match the index.
    """
    return unpack_array(_payload(record), index)


def unpack_array(payload: np.ndarray, index: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of a flat ``uint8`` ``payload`` (see :func:`pack_array`) described by
    ``index``: views into the payload, in index order.

    Raises:
        WireError: the payload does not match the index.
    """
    if not isinstance(payload, np.ndarray) or payload.dtype != np.uint8 or payload.ndim != 1:
        raise WireError(
            f"the packed payload must be a flat uint8 array, got "
            f"{getattr(payload, 'dtype', type(payload).__name__)} "
            f"of shape {getattr(payload, 'shape', '?')}"
        )
    keys, dtypes, ndims, dims, offsets = _index_lists(index)
    if index["nbytes"] != payload.size:
        raise WireError(
            f"{INDEX!r} says the payload has {index['nbytes']!r} bytes but it has {payload.size}"
        )
    if sum(int(n) for n in ndims) != len(dims):
        raise WireError(
            f"{INDEX!r} ndims add up to {sum(int(n) for n in ndims)} but it lists {len(dims)} dims"
        )
    arrays: dict[str, np.ndarray] = {}
    end = 0
    cursor = 0
    for key, dtype_str, ndim, offset in zip(keys, dtypes, ndims, offsets, strict=True):
        if key in arrays:
            raise WireError(f"{INDEX!r} lists array {key!r} twice")
        if len(dtype_str) > 8:  # '<f4', '|b1', '<c16': anything longer is not a plain number
            raise WireError(
                f"array {key!r} has dtype {dtype_str[:40]!r}: not a plain numeric dtype"
            )
        try:
            dtype = np.dtype(dtype_str)
        except (TypeError, ValueError) as err:
            raise WireError(f"array {key!r} has an unknown dtype {dtype_str!r}") from err
        if dtype.kind not in _KINDS or dtype.str != dtype_str:
            raise WireError(f"array {key!r} has dtype {dtype_str!r}: not a plain numeric dtype")
        if not 0 <= ndim <= _MAX_NDIM:
            raise WireError(f"array {key!r} has ndim {ndim}: it must be in [0, {_MAX_NDIM}]")
        shape = tuple(dims[cursor : cursor + ndim])
        cursor += ndim
        if any(d < 0 for d in shape):
            raise WireError(f"array {key!r} has a negative dimension in shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no silent wrap-around
        if offset < end or offset % ALIGN:
            raise WireError(
                f"array {key!r} starts at byte {offset}: offsets must be multiples of {ALIGN} "
                f"and not overlap the previous array (which ends at {end})"
            )
        end = offset + nbytes
        if end > payload.size:
            raise WireError(
                f"array {key!r} ({dtype_str}, shape {shape}) needs bytes [{offset}, {end}) but "
                f"the payload has {payload.size}"
            )
        try:
            arrays[str(key)] = payload[offset:end].view(dtype).reshape(shape)
        except (ValueError, TypeError) as err:
            raise WireError(f"array {key!r} ({dtype_str}, shape {shape}): {err}") from err
    return arrays


def unpack_content(content: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """:func:`unpack` the ``arrays``/``arrays-index`` records of a message's content."""
    if ARRAYS not in content or not isinstance(content[ARRAYS], ArrayRecord):
        raise WireError(f"the message has no ArrayRecord {ARRAYS!r}")
    if INDEX not in content or not isinstance(content[INDEX], ConfigRecord):
        raise WireError(f"the message has no ConfigRecord {INDEX!r} (the packed arrays' index)")
    return unpack(content[ARRAYS], content[INDEX])


def join_models(models: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One flat dict of several models' arrays, keyed ``<label>::<key>``, for :func:`pack`.

    Example:
        >>> sorted(join_models({"global-final": {"w": np.zeros(1)}}))
        ['global-final::w']
    """
    return {
        f"{label}{MODEL_SEPARATOR}{key}": value
        for label, arrays in models.items()
        for key, value in arrays.items()
    }


def split_models(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Inverse of :func:`join_models`; ValueError for a key without a label or a name."""
    models: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        label, sep, name = key.partition(MODEL_SEPARATOR)
        if not sep or not label or not name:
            raise ValueError(f"array key {key[:80]!r} is not '<model>{MODEL_SEPARATOR}<key>'")
        models.setdefault(label, {})[name] = value
    return models


def _few(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return f"[{shown}{f' and {len(names) - 3} more' if len(names) > 3 else ''}]"
