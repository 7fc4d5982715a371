"""The site data check: every problem in a site folder, reported at once, before training.

Checks, per case: the image and label are readable NIfTI (not truncated), the label has the
image's shape and affine (within ``affine_atol`` mm), label values are declared classes, the
image has no NaN/inf; per folder: it exists and is not empty, its layout is known, every file
``dataset.json`` lists exists, every label has an image. The same :func:`check_case` guards the
pipeline through :func:`ensure_case_ok`.

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
from fedmed.io.msd import DATASET_JSON, SiteDataset, case_id_from_path, load_site_dataset
from fedmed.io.nifti import is_nifti, read_nifti, read_nifti_header

__all__ = [
    "DEFAULT_AFFINE_ATOL",
    "Problem",
    "check_case",
    "check_image",
    "check_site_folder",
    "ensure_case_ok",
]

DEFAULT_AFFINE_ATOL = 1e-3  # mm; float32 header storage alone differs by ~1e-5


@dataclass(frozen=True)
class Problem:
    """One problem with one file or folder; ``str()`` gives ``"path: message"``.

    Example:
        >>> str(Problem(Path("labelsTr/p03.nii.gz"), "label values [2] are not declared"))
        'labelsTr/p03.nii.gz: label values [2] are not declared'
    """

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def check_image(image_path: str | Path) -> list[Problem]:
    """Problems of an image on its own: unreadable or truncated, NaN/inf voxels."""
    image_path = Path(image_path)
    problems, _ = _check_image(image_path)
    return problems


def check_case(
    image_path: str | Path,
    label_path: str | Path,
    label_classes: Iterable[int],
    *,
    affine_atol: float = DEFAULT_AFFINE_ATOL,
) -> list[Problem]:
    """Every problem of one image/label pair (an empty list when the pair is fine)."""
    image_path, label_path = Path(image_path), Path(label_path)
    classes = frozenset(int(c) for c in label_classes)
    problems, image_header = _check_image(image_path)
    label_header = _header(label_path, problems)
    if label_header is not None:
        problems += _label_value_problems(label_path, classes)
    if image_header is None or label_header is None:
        return problems
    image_shape, image_affine = image_header
    label_shape, label_affine = label_header
    spatial = image_shape[:3]
    if _squeeze_channel(label_shape) != spatial:
        problems.append(
            Problem(
                label_path,
                f"shape {label_shape} differs from its image {image_path.name} {spatial}; "
                "re-export the label on the image grid",
            )
        )
    elif not np.allclose(label_affine, image_affine, rtol=0.0, atol=affine_atol):
        worst = float(np.max(np.abs(label_affine - image_affine)))
        problems.append(
            Problem(
                label_path,
                f"affine differs from its image {image_path.name} by up to {worst:.4g} mm "
                f"(tolerance {affine_atol:g} mm); the label is not on the image grid, "
                "re-export it with the image's geometry",
            )
        )
    return problems


def ensure_case_ok(
    image_path: str | Path,
    label_path: str | Path,
    label_classes: Iterable[int],
    *,
    affine_atol: float = DEFAULT_AFFINE_ATOL,
) -> None:
    """Raise :class:`DataError` listing every problem of the pair; return quietly if none."""
    problems = check_case(image_path, label_path, label_classes, affine_atol=affine_atol)
    if problems:
        raise DataError("; ".join(str(p) for p in problems))


def check_site_folder(
    root: str | Path,
    *,
    affine_atol: float = DEFAULT_AFFINE_ATOL,
    progress: bool = False,
    workers: int = 1,
) -> list[Problem]:
    """Every problem in a site folder (MSD or pairs layout); an empty list when it is clean.

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
        site = load_site_dataset(root, require_files=False)
    except DataError as err:
        return [_problem_from_error(err, root)]
    problems = _orphan_label_problems(site)

    def one_case(case: dict[str, str]) -> list[Problem]:
        image, label = Path(case["image"]), Path(case["label"])
        missing = _missing_problems(site, case["case_id"], image, label)
        if missing:
            return missing + (check_image(image) if image.is_file() else [])
        return check_case(image, label, site.label_classes, affine_atol=affine_atol)

    bar = tqdm(
        total=len(site.cases), desc=site.name, unit="case", file=sys.stderr, disable=not progress
    )
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        for found in pool.map(one_case, site.cases):
            problems += found
            bar.update()
    for test_image in map(Path, site.test_images):
        if not test_image.is_file():
            problems.append(Problem(test_image, f'listed in {DATASET_JSON} "test" but not found'))
        else:
            problems += check_image(test_image)
    return problems


def _check_image(
    image_path: Path,
) -> tuple[list[Problem], tuple[tuple[int, ...], np.ndarray] | None]:
    problems: list[Problem] = []
    header = _header(image_path, problems)
    if header is None:
        return problems, None
    try:
        array = read_nifti(image_path).array
    except DataError as err:
        problems.append(_problem_from_error(err, image_path))
        return problems, header
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            problems.append(
                Problem(
                    image_path,
                    f"{bad} voxels are NaN or infinite; re-export the image or replace them "
                    "(e.g. with the air value -1000 HU for CT)",
                )
            )
    return problems, header


def _header(path: Path, problems: list[Problem]) -> tuple[tuple[int, ...], np.ndarray] | None:
    try:
        return read_nifti_header(path)
    except DataError as err:
        problems.append(_problem_from_error(err, path))
        return None


def _label_value_problems(label_path: Path, classes: frozenset[int]) -> list[Problem]:
    try:
        array = read_nifti(label_path).array
    except DataError as err:
        return [_problem_from_error(err, label_path)]
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
    values = _unique_ints(array)
    undeclared = sorted(set(values) - classes)
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


def _unique_ints(array: np.ndarray) -> list[int]:
    if array.size == 0:
        return []
    ints = array.astype(np.int64, copy=False).ravel()
    low, high = int(ints.min()), int(ints.max())
    if high - low <= 1 << 16:  # bincount is ~10x faster than np.unique on big volumes
        counts = np.bincount(ints - low, minlength=high - low + 1)
        return [int(v) + low for v in np.flatnonzero(counts)]
    return [int(v) for v in np.unique(ints)]


def _squeeze_channel(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:3] if len(shape) == 4 and shape[3] == 1 else shape


def _missing_problems(site: SiteDataset, case_id: str, image: Path, label: Path) -> list[Problem]:
    image_ok, label_ok = image.is_file(), label.is_file()
    if image_ok and label_ok:
        return []
    if site.layout == "pairs":
        if not image_ok:
            return [Problem(label, f"label without image: {image.name} not found beside it")]
        return [Problem(image, f"image without label: {label.name} not found beside it")]
    where = f'{DATASET_JSON} "training" (case {case_id})'
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
                f"label without image: no {case_id_from_path(label)} image in imagesTr/ and "
                f"not listed in {DATASET_JSON}; add the image or remove the label"
            )
        problems.append(Problem(label, message))
    return problems


def _problem_from_error(err: DataError, fallback: Path) -> Problem:
    text = str(err)
    head, sep, rest = text.partition(": ")
    if sep and ("/" in head or head.endswith((".gz", ".nii", ".json")) or head == str(fallback)):
        return Problem(Path(head), rest)
    return Problem(fallback, text)
