"""NIfTI header sanity: a header is read and judged before any voxel is read or allocated.

A NIfTI header says how much memory its voxels need, and a broken or hostile file can say
anything: negative or absurd dimensions, a datatype nothing can read, terabytes of voxels in a
76-byte file, a gzip bomb that inflates far past what the header declares. :func:`parse_header`
reads at most the first 544 bytes (decompressing no more than that for ``.nii.gz``), and
refuses with a :class:`~fedmed.errors.DataError` naming the file, what is wrong and the fix:

- anything that is not a regular file (a FIFO would block the reader forever, ``/dev/zero``
  never ends), a missing file, a name not ending in ``.nii``/``.nii.gz``;
- a header that is not NIfTI-1/NIfTI-2 in one file, 1-7 dimensions each >= 1, only 3D volumes
  or 4D with channels last;
- a datatype that is unknown or not a real number (complex, RGB, binary, float128);
- voxels needing more memory than ``max_bytes`` (:data:`DEFAULT_MAX_IMAGE_BYTES`);
- a data offset inside the header, and, for an uncompressed file, voxels the file is too
  short to hold (checked against its size on disk).

For ``.nii.gz`` the true data size is only known by inflating; :mod:`fedmed.io.nifti` then
reads no more than the declared size, with memory growing only as data actually arrives.

Example:
    >>> header = parse_header("imagesTr/p01.nii.gz")
    >>> header.shape, header.dtype, header.array_bytes
    ((512, 512, 120), dtype('int16'), 125829120)
"""

from __future__ import annotations

import gzip
import math
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np

from fedmed.errors import DataError
from fedmed.text import printable

# NIFTI_SUFFIXES and is_nifti live here but are exported by fedmed.io.nifti, their old home.
__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "NiftiHeader",
    "affine_problem",
    "check_memory",
    "open_stream",
    "parse_header",
    "regular_file_size",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DEFAULT_MAX_IMAGE_BYTES = 2 * 1024**3
_GIB = 1024**3
_HEADER_CLASSES = {348: nib.Nifti1Header, 540: nib.Nifti2Header}
_GZIP_MAGIC = b"\x1f\x8b"
# below this, a voxel's volume (mm^3) is no geometry: an all-zero or singular affine
_MIN_VOXEL_VOLUME = 1e-9


@dataclass(frozen=True)
class NiftiHeader:
    """A checked NIfTI header: what reading the voxels needs, nothing allocated yet.

    ``dtype`` is the stored type (with its byte order), ``offset`` where the voxels start in
    the (inflated) file, ``slope``/``inter`` the scaling to apply, ``array_bytes`` the memory
    of the array a default read makes (float32 for scaled or floating data, else the stored
    type, or the stored data when larger).
    """

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    affine: np.ndarray
    offset: int
    slope: float
    inter: float
    compressed: bool

    @property
    def voxels(self) -> int:
        """Number of voxels (all channels)."""
        return math.prod(self.shape)

    @property
    def data_bytes(self) -> int:
        """Bytes of stored voxel data the file must hold after ``offset``."""
        return self.voxels * self.dtype.itemsize

    @property
    def scaled(self) -> bool:
        """True when ``scl_slope``/``scl_inter`` change the stored values."""
        return (self.slope, self.inter) != (1.0, 0.0)

    @property
    def as_float(self) -> bool:
        """True when a default read returns float32 (scaled or floating data)."""
        return self.scaled or self.dtype.kind == "f"

    @property
    def array_bytes(self) -> int:
        """Memory of the array a default read returns, or of the stored data if larger."""
        return self.voxels * max(self.dtype.itemsize, 4 if self.as_float else 0)


def is_nifti(path: str | Path) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz``."""
    return str(path).endswith(NIFTI_SUFFIXES)


def parse_header(path: str | Path, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> NiftiHeader:
    """Read and check the header of a ``.nii``/``.nii.gz`` file (see the module docstring).

    Raises :class:`DataError` naming the file, the fault and the fix; ``max_bytes`` bounds
    :attr:`NiftiHeader.array_bytes`.
    """
    path = Path(path)
    file_size = regular_file_size(path)
    if not is_nifti(path):
        raise DataError(f"{printable(path)}: not a NIfTI file name (expected .nii or .nii.gz)")
    try:
        with open_stream(path) as stream:
            block = stream.read(max(_HEADER_CLASSES) + 4)
    except (OSError, EOFError, zlib.error) as err:
        raise _unreadable(path, f"{type(err).__name__}: {err}") from err
    raw = _identify(path, block)
    _check_dims(path, raw)
    dtype = _check_dtype(path, raw)
    offset = _check_offset(path, float(raw["vox_offset"]), raw, max_bytes)
    try:  # nibabel's own checks and fixes, as nibabel.load applies them
        header = type(raw)(block[: raw.sizeof_hdr], endianness=raw.endianness, check=True)
        shape = tuple(int(n) for n in header.get_data_shape())
        slope, inter = header.get_slope_inter()
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    except Exception as err:  # nibabel raises several types for inconsistent headers
        raise _unreadable(path, f"the header is invalid ({err})") from err
    parsed = NiftiHeader(
        path=path,
        shape=shape,
        dtype=dtype,
        affine=affine,
        offset=offset,
        slope=1.0 if slope is None else float(slope),
        inter=0.0 if inter is None else float(inter),
        compressed=str(path).endswith(".gz"),
    )
    check_memory(parsed, parsed.array_bytes, max_bytes)
    if not parsed.compressed and parsed.offset + parsed.data_bytes > file_size:
        raise DataError(
            f"{printable(path)}: truncated: the header declares {parsed.data_bytes} bytes of "
            f"voxels ({_describe(parsed)}) from byte {parsed.offset}, but the file has "
            f"{file_size} bytes; re-copy or re-export it"
        )
    return parsed


def check_memory(header: NiftiHeader, needed: int, max_bytes: int) -> None:
    """Raise DataError when reading ``header``'s voxels needs more than ``max_bytes``."""
    if needed > max_bytes:
        raise DataError(
            f"{printable(header.path)}: the header declares {_describe(header)}, "
            f"{needed / _GIB:.3g} GiB in memory, above the per-image limit of "
            f"{max_bytes / _GIB:.3g} GiB; if the scan is real, raise max-image-gib in the site "
            "config, otherwise the header is corrupt: re-export the file"
        )


def affine_problem(affine: np.ndarray) -> str | None:
    """Why ``affine`` gives no usable geometry (non-finite, all zero, singular), or None."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        return "its affine holds NaN or infinite values"
    volume = abs(float(np.linalg.det(affine[:3, :3])))
    if volume < _MIN_VOXEL_VOLUME:
        return (
            f"its affine is degenerate (voxel volume {volume:.3g} mm^3: all zero or singular), "
            "so voxels have no position or size"
        )
    return None


def regular_file_size(path: Path) -> int:
    """The size of ``path``, which must be a regular file (checked before it is opened)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{printable(path)}: file not found") from None
    except OSError as err:
        raise DataError(f"{printable(path)}: cannot read it ({err.strerror or err})") from err
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a folder"
            if stat.S_ISDIR(info.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(info.st_mode)
            else "a device or socket"
        )
        raise DataError(
            f"{printable(path)}: is {kind}, not a regular file; point at the file itself"
        )
    return info.st_size


def open_stream(path: Path) -> BinaryIO:
    """``path`` opened for reading, inflated on the fly when its name ends in ``.gz``."""
    if not str(path).endswith(".gz"):
        return open(path, "rb")  # the caller closes it
    with open(path, "rb") as raw:
        if raw.read(2) != _GZIP_MAGIC:
            raise _unreadable(path, "named .nii.gz but not gzip-compressed; rename it to .nii")
    return gzip.open(path, "rb")  # type: ignore[return-value]


def _identify(path: Path, block: bytes) -> nib.Nifti1Header:
    for size, klass in _HEADER_CLASSES.items():
        for order in ("little", "big"):
            if len(block) >= 4 and int.from_bytes(block[:4], order) == size:
                if len(block) < size:
                    raise _unreadable(
                        path, f"the header is cut short ({len(block)} of {size} bytes)"
                    )
                endianness = "<" if order == "little" else ">"
                header = klass(block[:size], endianness=endianness, check=False)
                magic = header["magic"].item()
                if magic != klass.single_magic:
                    raise _unreadable(
                        path,
                        f"header magic {magic!r} is not {klass.single_magic!r} (a detached "
                        ".hdr/.img pair or a corrupt header); convert it to one .nii.gz file",
                    )
                return header
    hint = "; it is gzip-compressed: name it .nii.gz" if block[:2] == _GZIP_MAGIC else ""
    raise _unreadable(path, f"no NIfTI-1 or NIfTI-2 header at its start{hint}")


def _check_dims(path: Path, header: nib.Nifti1Header) -> None:
    dim = [int(d) for d in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise _unreadable(path, f"dim[0] = {dim[0]} dimensions, a NIfTI file has 1 to 7")
    shape = dim[1 : dim[0] + 1]
    if any(n < 1 for n in shape):
        raise _unreadable(path, f"the header declares dimensions {tuple(shape)}; each must be >= 1")
    if len(shape) not in (3, 4):
        raise DataError(
            f"{printable(path)}: expected a 3D volume (or 4D with channels last), got "
            f"{len(shape)}D with shape {tuple(shape)}"
        )


def _check_dtype(path: Path, header: nib.Nifti1Header) -> np.dtype:
    code = int(header["datatype"])
    try:
        dtype = header.get_data_dtype()
    except KeyError:
        raise _unreadable(path, f"unknown NIfTI datatype code {code}") from None
    if dtype.names is not None:
        raise DataError(
            f"{printable(path)}: RGB colour voxels (NIfTI datatype {code}); fedmed reads "
            "single-channel scans: export a grayscale image"
        )
    if dtype.kind == "c":
        raise DataError(
            f"{printable(path)}: complex voxels ({dtype.name}); fedmed reads real-valued scans: "
            "export the magnitude as float32"
        )
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise DataError(
            f"{printable(path)}: NIfTI datatype {code} ({dtype}) is not supported; export the "
            "scan as int16 or float32 and the label as uint8"
        )
    return dtype


def _check_offset(path: Path, offset: float, header: nib.Nifti1Header, max_bytes: int) -> int:
    # the bytes before the voxels are inflated (.gz) or skipped too: bound them like the voxels
    minimum = header.single_vox_offset
    if not (math.isfinite(offset) and offset == int(offset) and minimum <= offset <= max_bytes):
        raise _unreadable(
            path,
            f"vox_offset {offset:g} must be a whole number of bytes from {minimum} to the "
            f"per-image limit {max_bytes}",
        )
    return int(offset)


def _describe(header: NiftiHeader) -> str:
    return f"{'x'.join(map(str, header.shape))} voxels of {header.dtype.name}"


def _unreadable(path: Path, reason: str) -> DataError:
    return DataError(f"{printable(path)}: not a readable NIfTI file: {reason}; re-export it")
