"""NIfTI read/write with geometry; errors name the file.

Reading applies ``scl_slope``/``scl_inter`` (int16 CT stored with a rescale comes back in HU),
keeps the affine, and never lets a bare nibabel/numpy exception escape. It is bounded by what
the file can honestly hold: the header is checked first (:func:`~fedmed.io.header.parse_header`:
dimensions, datatype, memory against ``max_bytes``, size on disk), then exactly the declared
voxel bytes are read. For ``.nii.gz`` no more than the declared size is ever inflated, and
memory grows only as inflated data arrives, so a truncated file or a gzip bomb costs what it
really contains, not what its header claims. Scaling is applied in slices of
:data:`_CHUNK_VOXELS` voxels, so a read holds the stored data plus the float32 result.

Example:
    >>> volume = read_nifti("imagesTr/p01.nii.gz")
    >>> volume.array.shape, volume.spacing
    ((64, 64, 32), (0.7, 0.7, 2.5))
    >>> write_nifti("pred/p01.nii.gz", prediction, volume.affine, dtype=np.uint8)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np

from fedmed.errors import DataError
from fedmed.io.header import (
    DEFAULT_MAX_IMAGE_BYTES,
    NIFTI_SUFFIXES,
    NiftiHeader,
    check_memory,
    is_nifti,
    open_stream,
    parse_header,
)
from fedmed.text import printable

__all__ = [
    "NIFTI_SUFFIXES",
    "NiftiVolume",
    "is_nifti",
    "read_nifti",
    "read_nifti_header",
    "write_nifti",
]

_READ_CHUNK = 2**20  # bytes inflated per read call (the reader holds about twice this)
_CHUNK_VOXELS = 4 * 2**20  # voxels scaled at a time (a float64 scratch of 32 MiB)


@dataclass(frozen=True)
class NiftiVolume:
    """A volume as read from disk: the voxel array and its voxel-to-world (RAS mm) affine."""

    array: np.ndarray
    affine: np.ndarray
    path: Path

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def read_nifti_header(
    path: str | Path, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine without reading the voxels (fast, for checks); the header is checked
    as :func:`~fedmed.io.header.parse_header` does."""
    header = parse_header(path, max_bytes=max_bytes)
    return header.shape, header.affine


def read_nifti(
    path: str | Path,
    *,
    dtype: np.dtype | type | None = None,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> NiftiVolume:
    """Read a NIfTI file with its scaling applied.

    ``dtype=None`` returns float32 for scaled or floating data and the stored integer type
    otherwise (labels stay integers). ``max_bytes`` bounds the memory of the array (or of
    the stored data when larger). Raises :class:`DataError` naming the file when it is
    missing, not a regular file, not NIfTI, too large, truncated or corrupt.
    """
    header = parse_header(path, max_bytes=max_bytes)
    as_float = header.as_float or dtype is not None
    if dtype is not None:
        out_size = max(4, np.dtype(dtype).itemsize)
        check_memory(header, header.voxels * max(header.dtype.itemsize, out_size), max_bytes)
    stored = _read_voxels(header)
    array = _to_float32(stored, header) if as_float else stored
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return NiftiVolume(array=array, affine=header.affine, path=header.path)


def write_nifti(
    path: str | Path,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write ``array`` with ``affine`` (both sform and qform set); parent folders are created.

    The file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    path = Path(path)
    if not is_nifti(path):
        raise DataError(f"{printable(path)}: a NIfTI file name must end in .nii or .nii.gz")
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise DataError(f"{printable(path)}: the affine must be 4x4, got shape {affine.shape}")
    image = nib.Nifti1Image(array, affine)
    image.header.set_sform(affine, code=1)
    image.header.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
    tmp = path.with_name(f".{path.name}.tmp{suffix}")
    try:
        nib.save(image, tmp)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{printable(path)}: cannot write the file ({err})") from err
    return path


def _read_voxels(header: NiftiHeader) -> np.ndarray:
    """The stored voxels, native byte order, shape ``header.shape`` (Fortran order)."""
    try:
        with open_stream(header.path) as stream:
            if header.compressed:
                _skip(stream, header.offset)
                buffer = _read_growing(stream, header.data_bytes)
            else:
                stream.seek(header.offset)
                buffer = _read_exact(stream, header.data_bytes)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{printable(header.path)}: the voxel data cannot be read ({err}); the file is "
            "truncated or corrupt, re-export or re-copy it"
        ) from err
    if len(buffer) < header.data_bytes:
        raise DataError(
            f"{printable(header.path)}: truncated or corrupt: the header declares "
            f"{header.data_bytes} bytes of voxels but the file holds {len(buffer)}; re-export "
            "or re-copy it"
        )
    array = np.frombuffer(buffer, dtype=header.dtype).reshape(header.shape, order="F")
    if not header.dtype.isnative:
        array = array.astype(header.dtype.newbyteorder("="))
    return array


def _skip(stream: BinaryIO, count: int) -> None:
    left = count
    while left > 0:
        chunk = stream.read(min(_READ_CHUNK, left))
        if not chunk:
            return  # the short voxel read that follows reports the truncation
        left -= len(chunk)


def _read_growing(stream: BinaryIO, count: int) -> bytearray:
    # Never allocate what the header claims up front: grow as inflated data arrives, so a
    # truncated file or a lying header costs only what the file really holds.
    buffer = bytearray()
    while len(buffer) < count:
        chunk = stream.read(min(_READ_CHUNK, count - len(buffer)))
        if not chunk:
            break
        buffer += chunk
    return buffer


def _read_exact(stream: BinaryIO, count: int) -> bytearray:
    # The file's size was checked against ``count``: allocating it is bounded by the file.
    buffer = bytearray(count)
    view = memoryview(buffer)
    done = 0
    while done < count:
        read = stream.readinto(view[done:])  # type: ignore[attr-defined]
        if not read:
            return buffer[:done]
        done += read
    return buffer


def _to_float32(stored: np.ndarray, header: NiftiHeader) -> np.ndarray:
    """``stored * slope + inter`` as float32, computed in float64 as nibabel's ``get_fdata``
    does (the same values), a slice at a time so the float64 scratch stays small."""
    if stored.dtype == np.float32 and not header.scaled:
        return stored
    out = np.empty(stored.shape, dtype=np.float32, order="F")
    source = stored.reshape(-1, order="F")
    target = out.reshape(-1, order="F")
    scratch = np.empty(min(_CHUNK_VOXELS, source.size), dtype=np.float64)
    for start in range(0, source.size, _CHUNK_VOXELS):
        part = scratch[: min(_CHUNK_VOXELS, source.size - start)]
        part[...] = source[start : start + part.size]
        if header.slope != 1.0:
            part *= header.slope
        if header.inter != 0.0:
            part += header.inter
        target[start : start + part.size] = part
    return out
