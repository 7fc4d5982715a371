"""Hand-made NIfTI files for the header and reader tests: any header, any payload."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

HEADER_BYTES = 352  # NIfTI-1 header + the 4-byte extension flag


def raw_header(
    shape: Sequence[int],
    dtype: np.dtype | type = np.float32,
    *,
    datatype: int | None = None,
    vox_offset: float = HEADER_BYTES,
    affine: np.ndarray | None = None,
    slope: float = 1.0,
    inter: float = 0.0,
) -> bytes:
    """The 352 bytes of a single-file NIfTI-1 header declaring ``shape`` of ``dtype``, written
    field by field so that nibabel's own checks do not stop impossible values."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    if datatype is not None:
        header["datatype"] = datatype
    header["dim"] = [len(shape), *shape, *([1] * (7 - len(shape)))]
    header["pixdim"] = [1.0] * 8
    header.set_sform(np.eye(4) if affine is None else affine, code=1)
    header["vox_offset"] = vox_offset
    header["scl_slope"], header["scl_inter"] = slope, inter
    header["magic"] = b"n+1"
    return header.binaryblock + b"\0\0\0\0"


def write_raw(path: Path, header: bytes, data: bytes = b"", *, members: int = 0) -> Path:
    """Write ``header + data`` (gzip-compressed when ``path`` ends in ``.gz``); ``members``
    appends that many further gzip members of 1 MiB of zeros each (a gzip bomb's tail)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not str(path).endswith(".gz"):
        path.write_bytes(header + data)
        return path
    blob = gzip.compress(header + data, compresslevel=1)
    if members:
        blob += gzip.compress(bytes(2**20), compresslevel=9) * members
    path.write_bytes(blob)
    return path
