"""Reading voxels: the values nibabel gives, and memory bounded by what the file really holds."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nifti_files import raw_header, write_raw

from fedmed.errors import DataError
from fedmed.io.nifti import read_nifti, write_nifti

MIB = 2**20


def _peak_bytes(action: Callable[[], object]) -> tuple[int, object]:
    """Peak traced memory (Python and numpy allocations) while ``action`` runs, and its
    result (or the DataError it raised)."""
    tracemalloc.start()
    try:
        result: object = action()
    except DataError as err:
        result = err
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, result


def test_truncated_gz_costs_what_it_holds_not_what_it_declares(tmp_path: Path) -> None:
    # the probe: a 76-byte .nii.gz whose header declares 1 GiB allocated 1.1 GB before the
    # truncation was reported
    path = write_raw(tmp_path / "cut.nii.gz", raw_header((1024, 1024, 256)))
    assert path.stat().st_size < 100

    peak, error = _peak_bytes(lambda: read_nifti(path))

    assert isinstance(error, DataError)
    assert str(error) == (
        f"{path}: truncated or corrupt: the header declares 1073741824 bytes of voxels but "
        "the file holds 0; re-export or re-copy it"
    )
    assert peak < 4 * MIB


def test_gzip_bomb_is_inflated_no_further_than_its_header_declares(tmp_path: Path) -> None:
    # 256 KiB of declared voxels, then 256 MiB of zeros in further gzip members
    data = np.arange(64**3, dtype=np.uint8).tobytes()
    path = write_raw(
        tmp_path / "bomb.nii.gz", raw_header((64, 64, 64), np.uint8), data, members=256
    )

    peak, volume = _peak_bytes(lambda: read_nifti(path))

    assert volume.array.shape == (64, 64, 64)  # type: ignore[union-attr]
    assert peak < 4 * MIB


def test_gzip_bomb_above_the_limit_is_refused_before_inflating(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "bomb.nii.gz", raw_header((512, 512, 128), np.uint8), members=32)

    peak, error = _peak_bytes(lambda: read_nifti(path, max_bytes=16 * MIB))

    assert isinstance(error, DataError)
    assert "the header declares 512x512x128 voxels of uint8, 0.0312 GiB in memory" in str(error)
    assert peak < 4 * MIB


@pytest.mark.slow
def test_scaled_int16_read_holds_the_stored_data_and_the_float32_result_only(
    tmp_path: Path,
) -> None:
    # the probe: a 585 KB bomb of int16 peaked at 5x its declared size (float64 scaling)
    shape = (256, 256, 256)
    stored, result = 2 * 256**3, 4 * 256**3
    path = write_raw(
        tmp_path / "ct.nii.gz", raw_header(shape, np.int16, slope=0.5, inter=-1024), bytes(stored)
    )

    peak, volume = _peak_bytes(lambda: read_nifti(path))

    assert volume.array.dtype == np.float32 and float(volume.array.max()) == -1024.0  # type: ignore[union-attr]
    assert peak < stored + result + 48 * MIB


@pytest.mark.parametrize(
    ("dtype", "slope", "inter", "suffix"),
    [
        (">f8", 2.5, -3.0, ".nii"),
        ("<i2", 0.7, -1024.0, ".nii.gz"),
        (">u2", 1.0, 0.0, ".nii.gz"),
        ("<f4", 1.0, 0.0, ".nii"),
    ],
    ids=["big-endian-float64-scaled", "int16-scaled", "big-endian-uint16", "float32"],
)
def test_values_match_nibabel(tmp_path: Path, dtype, slope, inter, suffix) -> None:
    rng = np.random.default_rng(0)
    array = (rng.normal(0, 300, size=(9, 8, 7))).astype(dtype)
    image = nib.Nifti1Image(array, np.diag([0.7, 0.8, 2.5, 1.0]))
    image.header.set_slope_inter(slope, inter)
    path = tmp_path / f"v{suffix}"
    nib.save(image, path)
    loaded = nib.load(path)
    scaled = (slope, inter) != (1.0, 0.0) or array.dtype.kind == "f"
    expected = loaded.get_fdata(dtype=np.float32) if scaled else np.asarray(loaded.dataobj)

    volume = read_nifti(path)

    assert volume.array.dtype == (np.float32 if scaled else np.dtype(dtype).newbyteorder("="))
    assert np.array_equal(volume.array, expected)
    assert np.array_equal(volume.affine, loaded.affine)


def test_labels_stay_integers_and_a_requested_dtype_is_honoured(tmp_path: Path) -> None:
    label = (np.arange(60) % 3).astype(np.uint8).reshape(3, 4, 5)
    path = write_nifti(tmp_path / "l.nii.gz", label, np.eye(4))

    assert read_nifti(path).array.dtype == np.uint8
    assert np.array_equal(read_nifti(path).array, label)
    assert read_nifti(path, dtype=np.int64).array.dtype == np.int64
