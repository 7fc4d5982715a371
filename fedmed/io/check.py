"""The site data check: every problem in a site folder, reported at once, before training.

Checks, per case: the image and label are readable NIfTI within the per-image memory limit
(not truncated, a supported real-valued datatype, see :mod:`fedmed.io.header`), the image has
one channel and a usable affine (not all zero, singular or non-finite), the label has the
image's shape and affine (within ``affine_atol`` mm), label values are declared classes, the
image has no NaN/inf; per folder: it exists and is not empty, its layout is known, its
``dataset.json`` is sound and lists only files inside the folder, every file it lists exists,
every label has an image.

The checks come in two halves that the training pipeline runs apart: :func:`header_problems`
reads headers only (cheap, run for every case when cases are listed) and
:func:`value_problems` looks at voxel arrays already in memory (run on the data the pipeline
loads anyway); :func:`check_case` runs both on the files. File names in problems are escaped
with :func:`~fedmed.text.printable`.

Example:
    >>> for problem in check_site_folder("demo/data/site-A"):
    ...     print(problem)
    /data/site-A/labelsTr/p03.nii.gz: shape (64, 64, 31) differs from its image ...
    >>> ensure_case_ok("p01_img.nii.gz", "p01_seg.nii.gz", {0, 1})  # raises DataError if not
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fedmed.errors import ConfigError, DataError
from fedmed.io.header import DEFAULT_MAX_IMAGE_BYTES, NiftiHeader, affine_problem, parse_header
from fedmed.io.msd import DATASET_JSON, SiteDataset, case_id_from_path, load_site_dataset
from fedmed.io.nifti import is_nifti, read_nifti
from fedmed.text import printable

__all__ = [
    "DEFAULT_AFFINE_ATOL",
    "Problem",
    "check_case",
    "check_image",
    "check_site_folder",
    "ensure_case_ok",
    "header_problems",
    "value_problems",
]

DEFAULT_AFFINE_ATOL = 1e-3  # mm; float32 header storage alone differs by ~1e-5
_CHUNK = 4 * 2**20  # voxels counted at a time (bounded scratch memory)


@dataclass(frozen=True)
class Problem:
    """One problem with one file or folder; ``str()`` gives ``"path: message"`` with the path
    escaped (:func:`~fedmed.text.printable`).

    Example:
        >>> str(Problem(Path("labelsTr/p03.nii.gz"), "label values [2] are not declared"))
        'labelsTr/p03.nii.gz: label values [2] are not declared'
    """

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{printable(self.path)}: {self.message}"


def check_image(
    image_path: str | Path, *, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> list[Problem]:
    """Problems of an image on its own: unreadable, too large or truncated, several
    channels, an unusable affine, NaN/inf voxels."""
    image_path = Path(image_path)
    problems: list[Problem] = []
    header = _header(image_path, problems, max_image_bytes)
    if header is not None:
        problems += _image_header_problems(header)
        problems += _image_values(image_path, problems, max_image_bytes)
    return problems


def header_problems(
    image_path: str | Path,
    label_path: str | Path,
    *,
    affine_atol: float = DEFAULT_AFFINE_ATOL,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> list[Problem]:
    """Problems of a pair visible in the headers alone (no voxel is read): unreadable or
    oversized files, several channels, unusable affines, label off the image grid."""
    problems: list[Problem] = []
    image = _header(Path(image_path), problems, max_image_bytes)
    label = _header(Path(label_path), problems, max_image_bytes)
    if image is not None:
        problems += _image_header_problems(image)
    if image is not None and label is not None:
        problems += _grid_problems(image, label, affine_atol)
    return problems


def value_problems(
    image_path: str | Path,
    image: np.ndarray | None,
    label_path: str | Path,
    label: np.ndarray | None,
    label_classes: Iterable[int],
) -> list[Problem]:
    """Problems of a pair's voxels, on arrays already read: NaN/inf in the image, label
    values that are not whole declared class numbers (``None`` skips an array)."""
    problems = []
    if image is not None:
        bad = _nonfinite_count(image)
        if bad:
            problems.append(
                Problem(
                    Path(image_path),
                    f"{bad} voxels are NaN or infinite; re-export the image or replace them "
                    "(e.g. with the air value -1000 HU for CT)",
                )
            )
    if label is not None:
        classes = frozenset(int(c) for c in label_classes)
        problems += _label_value_problems(Path(label_path), label, classes)
    return problems


def check_case(
    image_path: str | Path,
    label_path: str | Path,
    label_classes: Iterable[int],
    *,
    affine_atol: float = DEFAULT_AFFINE_ATOL,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> list[Problem]:
    """Every problem of one image/label pair (an empty list when the pair is fine)."""
    image_path, label_path = Path(image_path), Path(label_path)
    problems: list[Problem] = []
    image = _header(image_path, problems, max_image_bytes)
    if image is not None:
        problems += _image_header_problems(image)
        problems += _image_values(image_path, problems, max_image_bytes)
    label = _header(label_path, problems, max_image_bytes)
    if label is not None:
        array = _read(label_path, problems, max_image_bytes)
        if array is not None:
            problems += value_problems(image_path, None, label_path, array, label_classes)
    if image is not None and label is not None:
        problems += _grid_problems(image, label, affine_atol)
    return problems


def ensure_case_ok(
    image_path: str | Path,
    label_path: str | Path,
    label_classes: Iterable[int],
    *,
    affine_atol: float = DEFAULT_AFFINE_ATOL,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> None:
    """Raise :class:`DataError` listing every problem of the pair; return quietly if none."""
    problems = check_case(
        image_path,
        label_path,
        label_classes,
        affine_atol=affine_atol,
        max_image_bytes=max_image_bytes,
    )
    if problems:
        raise DataError("; ".join(str(p) for p in problems))


def check_site_folder(
    root: str | Path,
    *,
    affine_atol: float = DEFAULT_AFFINE_ATOL,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    allow_external_links: bool = False,
    progress: bool = False,
    workers: int = 1,
) -> list[Problem]:
    """Every problem in a site folder (MSD or pairs layout); an empty list when it is clean.

    ``affine_atol``, ``max_image_bytes`` and ``allow_external_links`` are the site config's
    ``label-affine-tolerance``, ``max-image-gib`` and ``allow-external-links``.
    ``progress`` shows a per-case progress bar on stderr (for big folders); ``workers`` > 1
    checks cases in that many threads (decompression and numpy release the GIL; each thread
    holds one volume in memory). The order of the problems does not depend on ``workers``.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    root = Path(root)
    if not root.is_dir():
        return [Problem(root, "site data folder not found (or not a folder)")]
    try:
        site = load_site_dataset(
            root, require_files=False, allow_external_links=allow_external_links
        )
    except DataError as err:
        return [_problem_from_error(err, root)]
    problems = _orphan_label_problems(site)
    limit = {"max_image_bytes": max_image_bytes}

    def one_case(case: dict[str, str]) -> list[Problem]:
        image, label = Path(case["image"]), Path(case["label"])
        missing = _missing_problems(site, case["case_id"], image, label)
        if missing:
            return missing + (check_image(image, **limit) if image.is_file() else [])
        return check_case(image, label, site.label_classes, affine_atol=affine_atol, **limit)

    bar = tqdm(
        total=len(site.cases),
        desc=printable(site.name),
        unit="case",
        file=sys.stderr,
        disable=not progress,
    )
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        for found in pool.map(one_case, site.cases):
            problems += found
            bar.update()
    for test_image in map(Path, site.test_images):
        if not test_image.is_file():
            problems.append(Problem(test_image, f'listed in {DATASET_JSON} "test" but not found'))
        else:
            problems += check_image(test_image, **limit)
    return problems


def _header(path: Path, problems: list[Problem], max_image_bytes: int) -> NiftiHeader | None:
    try:
        return parse_header(path, max_bytes=max_image_bytes)
    except DataError as err:
        problems.append(_problem_from_error(err, path))
        return None


def _read(path: Path, problems: list[Problem], max_image_bytes: int) -> np.ndarray | None:
    try:
        return read_nifti(path, max_bytes=max_image_bytes).array
    except DataError as err:
        problems.append(_problem_from_error(err, path))
        return None


def _image_values(path: Path, problems: list[Problem], max_image_bytes: int) -> list[Problem]:
    array = _read(path, problems, max_image_bytes)
    return [] if array is None else value_problems(path, array, path, None, ())


def _image_header_problems(header: NiftiHeader) -> list[Problem]:
    problems = []
    if len(header.shape) == 4 and header.shape[3] != 1:
        problems.append(
            Problem(
                header.path,
                f"{header.shape[3]} channels (shape {header.shape}); fedmed's models read "
                "one-channel scans: export a 3D volume per scan",
            )
        )
    unusable = affine_problem(header.affine)
    if unusable:
        problems.append(
            Problem(header.path, f"{unusable}; re-export it with the scanner's geometry")
        )
    return problems


def _grid_problems(image: NiftiHeader, label: NiftiHeader, affine_atol: float) -> list[Problem]:
    spatial = image.shape[:3]
    name = printable(image.path.name)
    if _squeeze_channel(label.shape) != spatial:
        message = (
            f"shape {label.shape} differs from its image {name} {spatial}; "
            "re-export the label on the image grid"
        )
        return [Problem(label.path, message)]
    with np.errstate(invalid="ignore"):
        worst = float(np.max(np.abs(label.affine - image.affine)))
    if not worst <= affine_atol:  # NaN fails too
        message = (
            f"affine differs from its image {name} by up to {worst:.4g} mm "
            f"(tolerance {affine_atol:g} mm); the label is not on the image grid, "
            "re-export it with the image's geometry"
        )
        return [Problem(label.path, message)]
    return []


def _label_value_problems(
    label_path: Path, array: np.ndarray, classes: frozenset[int]
) -> list[Problem]:
    problems = []
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            problems.append(
                Problem(
                    label_path,
                    f"{array.size - np.count_nonzero(finite)} voxels are NaN or "
                    "infinite in a label; re-export it with integer class values",
                )
            )
            array = array[finite]
        fractional = array != np.round(array)
        if fractional.any():
            problems.append(
                Problem(
                    label_path,
                    f"{np.count_nonzero(fractional)} voxels have non-integer label values "
                    f"(e.g. {float(array[fractional].flat[0]):g}); labels must be class "
                    "numbers, re-export with nearest-neighbour interpolation",
                )
            )
            array = array[~fractional]
    undeclared = sorted(set(_unique_ints(array)) - classes)
    if undeclared:
        shown = ", ".join(str(v) for v in undeclared[:10])
        shown += ", ..." if len(undeclared) > 10 else ""
        problems.append(
            Problem(
                label_path,
                f"label values [{shown}] are not declared classes {sorted(classes)}; fix the "
                f'label or declare the classes in {DATASET_JSON} "labels"',
            )
        )
    return problems


def _nonfinite_count(array: np.ndarray) -> int:
    if array.dtype.kind != "f":
        return 0
    # a float64 sum is finite exactly when every float32 voxel is (no overflow possible)
    if array.dtype.itemsize <= 4 and np.isfinite(np.sum(array, dtype=np.float64)):
        return 0
    flat = array.reshape(-1, order="A")
    chunks = range(0, flat.size, _CHUNK)
    return flat.size - sum(int(np.count_nonzero(np.isfinite(flat[i : i + _CHUNK]))) for i in chunks)


def _unique_ints(array: np.ndarray) -> list[int]:
    """The distinct values of an integer-valued array, counted a slice at a time."""
    if array.size == 0:
        return []
    flat = array.reshape(-1, order="A")
    low, high = int(flat.min()), int(flat.max())
    if high - low > 1 << 16:
        return [int(v) for v in np.unique(flat)]
    counts = np.zeros(high - low + 1, dtype=np.int64)
    for start in range(0, flat.size, _CHUNK):
        part = flat[start : start + _CHUNK].astype(np.int64) - low
        counts += np.bincount(part, minlength=counts.size)
    return [int(v) + low for v in np.flatnonzero(counts)]


def _squeeze_channel(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:3] if len(shape) == 4 and shape[3] == 1 else shape


def _missing_problems(site: SiteDataset, case_id: str, image: Path, label: Path) -> list[Problem]:
    image_ok, label_ok = image.is_file(), label.is_file()
    if image_ok and label_ok:
        return []
    if site.layout == "pairs":
        if not image_ok:
            missing = printable(image.name)
            return [Problem(label, f"label without image: {missing} not found beside it")]
        return [Problem(image, f"image without label: {printable(label.name)} not found beside it")]
    where = f'{DATASET_JSON} "training" (case {printable(case_id)})'
    return [
        Problem(path, f"{kind} listed in {where} not found; fix the path or restore the file")
        for path, ok, kind in ((image, image_ok, "image"), (label, label_ok, "label"))
        if not ok
    ]


def _orphan_label_problems(site: SiteDataset) -> list[Problem]:
    if site.layout != "msd":
        return []
    labels_dir, images_dir = site.root / "labelsTr", site.root / "imagesTr"
    if not labels_dir.is_dir():
        return []
    listed = {Path(c["label"]).resolve() for c in site.cases}
    image_ids = (
        {case_id_from_path(p) for p in images_dir.iterdir() if is_nifti(p)}
        if images_dir.is_dir()
        else set()
    )
    problems = []
    for label in sorted(p for p in labels_dir.iterdir() if is_nifti(p)):
        if label.resolve() in listed:
            continue
        if case_id_from_path(label) in image_ids:
            message = (
                f"neither this label nor its image in imagesTr/ is listed in {DATASET_JSON} "
                '"training"; add the pair or remove the files'
            )
        else:
            message = (
                f"label without image: no {printable(case_id_from_path(label))} image in "
                f"imagesTr/ and not listed in {DATASET_JSON}; add the image or remove the label"
            )
        problems.append(Problem(label, message))
    return problems


def _problem_from_error(err: DataError, path: Path) -> Problem:
    """A problem of ``path`` from an error whose message may start with the (escaped) path."""
    text = str(err)
    prefix = f"{printable(path)}: "
    if text.startswith(prefix):
        return Problem(path, text[len(prefix) :])
    head, sep, rest = text.partition(": ")
    if sep and ("/" in head or head.endswith((".gz", ".nii", ".json"))):  # e.g. dataset.json
        return Problem(Path(head), rest)
    return Problem(path, text)
