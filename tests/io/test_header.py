"""NIfTI header sanity: absurd headers are refused, by name, before anything is allocated."""

from __future__ import annotations

import gzip
import os
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from nifti_files import HEADER_BYTES, raw_header, write_raw

from fedmed.errors import DataError
from fedmed.io.header import DEFAULT_MAX_IMAGE_BYTES, affine_problem, parse_header
from fedmed.io.nifti import read_nifti, read_nifti_header

MIB = 2**20


def _peak_bytes(action: Callable[[], object]) -> tuple[int, DataError | None]:
    """Peak traced memory (Python and numpy allocations) while ``action`` runs."""
    tracemalloc.start()
    error = None
    try:
        action()
    except DataError as err:
        error = err
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, error


def _finishes(action: Callable[[], object], unblock: Path, seconds: float = 20.0) -> object:
    """Run ``action`` in a thread; if it blocks on the FIFO ``unblock``, open the FIFO's other
    end so that the thread ends, and fail."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(action())
        except Exception as err:  # handed to the test below
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(seconds)
        pytest.fail(f"reading {unblock} blocked for {seconds} s")
    return outcome[0]


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((-5, 4, 4), r"dimensions \(-5, 4, 4\); each must be >= 1"),
        ((4, 0, 4), r"dimensions \(4, 0, 4\); each must be >= 1"),
        ((4, 4), "expected a 3D volume"),
        ((4, 4, 4, 2, 3), "expected a 3D volume"),
    ],
    ids=["negative", "zero", "2d", "5d"],
)
def test_impossible_dimensions_are_refused_by_name(tmp_path: Path, shape, match) -> None:
    path = write_raw(tmp_path / "bad.nii.gz", raw_header(shape), bytes(64))

    with pytest.raises(DataError, match=match) as info:
        read_nifti(path)

    assert str(info.value).startswith(f"{path}: ")


def test_dim0_outside_1_to_7_is_refused(tmp_path: Path) -> None:
    header = bytearray(raw_header((4, 4, 4)))
    header[40:42] = (9).to_bytes(2, "little")  # dim[0]

    path = write_raw(tmp_path / "bad.nii", bytes(header), bytes(256))

    with pytest.raises(DataError, match=r"dim\[0\] = 9 dimensions, a NIfTI file has 1 to 7"):
        parse_header(path)


def test_seven_huge_dimensions_are_refused_without_overflow(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "huge.nii.gz", raw_header((32767,) * 4))

    peak, error = _peak_bytes(lambda: read_nifti(path))

    assert error is not None and "above the per-image limit of 2 GiB" in str(error)
    assert "32767x32767x32767x32767 voxels of float32" in str(error)
    assert peak < 4 * MIB


def test_gz_declaring_8_gib_is_refused_before_any_allocation(tmp_path: Path) -> None:
    # the probe: a small .nii.gz whose header asks for 8 GiB (2048 x 2048 x 512 float32)
    path = write_raw(tmp_path / "bomb.nii.gz", raw_header((2048, 2048, 512)), members=4)

    peak, error = _peak_bytes(lambda: read_nifti(path))

    assert error is not None
    assert str(error).startswith(f"{path}: the header declares 2048x2048x512 voxels of float32")
    assert "8 GiB in memory, above the per-image limit of 2 GiB" in str(error)
    assert "raise max-image-gib in the site config" in str(error)
    assert peak < 4 * MIB


def test_memory_limit_is_configurable_and_counts_the_float32_copy(tmp_path: Path) -> None:
    # int16 with a rescale is read as float32: 64^3 voxels need 1 MiB, not 512 KiB
    header = raw_header((64, 64, 64), np.int16, slope=0.5)
    path = write_raw(tmp_path / "ct.nii.gz", header, bytes(2 * 64**3))

    assert parse_header(path, max_bytes=MIB).array_bytes == MIB
    with pytest.raises(DataError, match=r"above the per-image limit of 0\.000977 GiB"):
        read_nifti(path, max_bytes=MIB - 1)
    assert DEFAULT_MAX_IMAGE_BYTES == 2 * 1024**3


@pytest.mark.parametrize(
    ("dtype", "datatype", "match"),
    [
        (np.complex64, None, r"complex voxels \(complex64\); fedmed reads real-valued scans"),
        (np.uint8, 128, r"RGB colour voxels \(NIfTI datatype 128\)"),
        (np.uint8, 2304, r"RGB colour voxels \(NIfTI datatype 2304\)"),
        (np.uint8, 1, r"NIfTI datatype 1 \(.*\) is not supported"),
        (np.uint8, 999, r"not a readable NIfTI file: unknown NIfTI datatype code 999"),
    ],
    ids=["complex", "rgb", "rgba", "binary", "unknown"],
)
def test_unsupported_datatypes_are_refused(tmp_path: Path, dtype, datatype, match) -> None:
    header = raw_header((4, 4, 4), dtype, datatype=datatype)
    path = write_raw(tmp_path / "odd.nii.gz", header, bytes(4 * 4 * 4 * 8))

    with pytest.raises(DataError, match=match):
        read_nifti(path)


def test_uncompressed_file_shorter_than_declared_is_refused_before_reading(
    tmp_path: Path,
) -> None:
    # 76 bytes of header is all there is; the header declares 1 GiB
    path = write_raw(tmp_path / "cut.nii", raw_header((1024, 1024, 256))[:76])
    with pytest.raises(DataError, match=r"not a readable NIfTI file: the header is cut short"):
        parse_header(path)
    path = write_raw(tmp_path / "short.nii", raw_header((1024, 1024, 256)), bytes(1000))

    peak, error = _peak_bytes(lambda: read_nifti(path))

    assert error is not None and "truncated: the header declares 1073741824 bytes" in str(error)
    assert "the file has 1352 bytes" in str(error)
    assert peak < 4 * MIB


@pytest.mark.parametrize(
    "offset", [0.0, 100.0, 352.5, float(2**40)], ids=["zero", "inside", "fraction", "huge"]
)
def test_vox_offset_must_be_past_the_header_and_within_the_limit(tmp_path, offset) -> None:
    path = write_raw(tmp_path / "x.nii.gz", raw_header((4, 4, 4), vox_offset=offset), bytes(256))

    with pytest.raises(DataError, match=r"vox_offset \S+ must be a whole number of bytes from 352"):
        read_nifti(path)


def test_gzip_name_on_a_plain_file_and_plain_name_on_gzip_are_explained(tmp_path: Path) -> None:
    plain = write_raw(tmp_path / "a.nii", raw_header((4, 4, 4)), bytes(256))
    renamed = plain.rename(tmp_path / "a.nii.gz")
    with pytest.raises(DataError, match=r"named \.nii\.gz but not gzip-compressed"):
        parse_header(renamed)
    packed = tmp_path / "b.nii"
    packed.write_bytes(gzip.compress(raw_header((4, 4, 4)) + bytes(256)))
    with pytest.raises(DataError, match=r"it is gzip-compressed: name it \.nii\.gz"):
        parse_header(packed)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "scan.nii.gz"
    os.mkfifo(fifo)

    outcome = _finishes(lambda: read_nifti_header(fifo), unblock=fifo)

    assert isinstance(outcome, DataError)
    assert str(outcome) == f"{fifo}: is a FIFO, not a regular file; point at the file itself"


def test_a_folder_or_device_is_not_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "d.nii").mkdir()
    with pytest.raises(DataError, match=r"d\.nii: is a folder, not a regular file"):
        parse_header(tmp_path / "d.nii")
    (tmp_path / "zero.nii").symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"zero\.nii: is a device or socket, not a regular file"):
        parse_header(tmp_path / "zero.nii")


@pytest.mark.parametrize(
    ("affine", "match"),
    [
        (np.zeros((4, 4)), "degenerate"),
        (np.diag([1.0, 0.0, 1.0, 1.0]), "degenerate"),
        (np.diag([1.0, np.nan, 1.0, 1.0]), "NaN or infinite"),
    ],
    ids=["zero", "singular", "nan"],
)
def test_affine_problem_names_unusable_geometry(affine, match) -> None:
    problem = affine_problem(affine)

    assert problem is not None and match in problem
    assert affine_problem(np.diag([0.7, 0.7, 2.5, 1.0])) is None


def test_header_is_parsed_from_its_first_bytes_only(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / "ok.nii.gz", raw_header((5, 6, 7), np.int16, slope=2.0), bytes(2 * 5 * 6 * 7)
    )

    header = parse_header(path)

    assert (header.shape, header.dtype, header.offset) == ((5, 6, 7), np.int16, HEADER_BYTES)
    assert (header.slope, header.inter, header.compressed) == (2.0, 0.0, True)
    assert header.data_bytes == 2 * 5 * 6 * 7 and header.array_bytes == 4 * 5 * 6 * 7
