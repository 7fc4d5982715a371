"""NIfTI read/write with geometry, via nibabel; errors name the file.

Reading applies ``scl_slope``/``scl_inter`` (int16 CT stored with a rescale comes back in HU),
keeps the affine, and never lets a bare nibabel/numpy exception escape.

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

import nibabel as nib
import numpy as np

from fedmed.errors import DataError

__all__ = [
    "NIFTI_SUFFIXES",
    "NiftiVolume",
    "is_nifti",
    "read_nifti",
    "read_nifti_header",
    "write_nifti",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


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


def is_nifti(path: str | Path) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz``."""
    return str(path).endswith(NIFTI_SUFFIXES)


def read_nifti_header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine without reading the voxels (fast, for checks)."""
    path = Path(path)
    image = _open(path)
    return tuple(int(s) for s in image.shape), np.asarray(image.affine, dtype=np.float64)


def read_nifti(path: str | Path, *, dtype: np.dtype | type | None = None) -> NiftiVolume:
    """Read a NIfTI file with its scaling applied.

    ``dtype=None`` returns float32 for scaled or floating data and the stored integer type
    otherwise (labels stay integers). Raises :class:`DataError` naming the file when it is
    missing, not NIfTI, truncated or corrupt.
    """
    path = Path(path)
    image = _open(path)
    try:
        if dtype is None:
            has_scale = _has_scaling(image)
            stored = image.get_data_dtype()
            if has_scale or np.issubdtype(stored, np.floating):
                array = np.asarray(image.get_fdata(dtype=np.float32))
            else:
                array = np.asarray(image.dataobj)
        else:
            array = np.asarray(image.get_fdata(dtype=np.float32)).astype(dtype, copy=False)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise DataError(
            f"{path}: the voxel data cannot be read ({err}); the file is truncated or corrupt, "
            "re-export or re-copy it"
        ) from err
    if array.ndim not in (3, 4):
        raise DataError(
            f"{path}: expected a 3D volume (or 4D with channels last), got {array.ndim}D with "
            f"shape {array.shape}"
        )
    return NiftiVolume(array=array, affine=np.asarray(image.affine, dtype=np.float64), path=path)


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
        raise DataError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise DataError(f"{path}: the affine must be 4x4, got shape {affine.shape}")
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
        raise DataError(f"{path}: cannot write the file ({err})") from err
    return path


def _open(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not is_nifti(path):
        raise DataError(f"{path}: not a NIfTI file name (expected .nii or .nii.gz)")
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises many types for broken headers
        raise DataError(
            f"{path}: not a readable NIfTI file ({type(err).__name__}: {err}); re-export it"
        ) from err
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: expected NIfTI-1 or NIfTI-2, got {type(image).__name__}")
    return image


def _has_scaling(image: nib.Nifti1Image) -> bool:
    # nibabel moves scl_slope/scl_inter from the header onto the array proxy when loading.
    slope = getattr(image.dataobj, "slope", 1.0)
    inter = getattr(image.dataobj, "inter", 0.0)
    return not (float(slope) == 1.0 and float(inter) == 0.0)
