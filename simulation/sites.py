"""Simulated site folders: pooled data split by patient, optional per-site scanner shifts.

The client app reads a site from an ordinary data folder, so the simulation builds ordinary
folders rather than forking the app: each site becomes ``<root>/site-X`` in the MSD layout,
whose files are hard links to the source scans (copies across file systems; files inside the
folder, as the site data rules of :mod:`fedmed.io.folder` require), or, for a site with a
:class:`ScannerShift`,
shifted copies (offset and noise added, in-plane resolution changed; labels resampled with
the image). The shift spec and the source of every case are recorded in the folder's
``dataset.json`` (``fedmed_sim``).

Example:
    >>> data = pooled_federation("pooled/", "run/data", sites=4, method="size-skew", alpha=0.3)
    >>> [p.name for p in data.sites], data.holdout.name
    (['site-A', 'site-B', 'site-C', 'site-D'], 'holdout')
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from fedmed.data.demo import site_name
from fedmed.errors import ConfigError, DataError
from fedmed.io.msd import DATASET_JSON, load_site_dataset, patient_id, split_cases
from fedmed.io.nifti import read_nifti, write_nifti

from .partition import split_patients

__all__ = [
    "ScannerShift",
    "SimData",
    "lesion_burden",
    "link_file",
    "pooled_federation",
    "shifted_federation",
]

logger = logging.getLogger(__name__)

_MARKER = ".fedmed-sim"
HOLDOUT_NAME = "holdout"


@dataclass(frozen=True)
class ScannerShift:
    """A simulated scanner difference applied to a site's images.

    ``hu_offset`` is added to every voxel, Gaussian noise of std ``noise_sigma`` (HU) is added,
    and ``spacing_scale`` multiplies the in-plane voxel size (the image is resampled: 2.0 halves
    the in-plane resolution). The identity shift leaves the files as links to the sources.

    Example:
        >>> ScannerShift(hu_offset=40.0, noise_sigma=25.0).is_identity
        False
    """

    hu_offset: float = 0.0
    noise_sigma: float = 0.0
    spacing_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.noise_sigma < 0:
            raise ConfigError(f"scanner shift noise-sigma is {self.noise_sigma}: it must be >= 0")
        if not 0.25 <= self.spacing_scale <= 4.0:
            raise ConfigError(
                f"scanner shift spacing-scale is {self.spacing_scale}: use 0.25 .. 4.0"
            )

    @property
    def is_identity(self) -> bool:
        """True when the shift changes nothing."""
        return self == ScannerShift()

    @classmethod
    def from_table(cls, table: Mapping[str, object], *, where: str) -> ScannerShift:
        """Read ``{hu-offset, noise-sigma, spacing-scale}`` (a TOML table) naming ``where``."""
        keys = {
            "hu-offset": "hu_offset",
            "noise-sigma": "noise_sigma",
            "spacing-scale": "spacing_scale",
        }
        unknown = sorted(set(table) - set(keys))
        if unknown:
            raise ConfigError(f"{where}: unknown shift keys {unknown}: use {sorted(keys)}")
        values = {}
        for key, name in keys.items():
            if key in table:
                value = table[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{where}.{key} is {value!r}: give a number")
                values[name] = float(value)
        return cls(**values)


@dataclass(frozen=True)
class SimData:
    """The site folders a simulation trains on and the server's held-out folder (or None)."""

    sites: tuple[Path, ...]
    holdout: Path | None


def lesion_burden(label_path: str | Path) -> float:
    """Fraction of labelled (non-zero) voxels in a label file."""
    label = read_nifti(label_path).array
    return float(np.count_nonzero(label)) / max(1, label.size)


def pooled_federation(
    pooled: str | Path,
    root: str | Path,
    *,
    sites: int,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    shifts: Mapping[int, ScannerShift] | None = None,
) -> SimData:
    """Split the pooled folder ``pooled`` into ``root/site-A`` ... by patient.

    With ``holdout_fraction > 0`` that share of patients (by :func:`split_cases`' seeded hash)
    first goes to ``root/holdout`` for the server's evaluation. ``shifts`` maps a site index to
    its scanner shift.
    """
    dataset = load_site_dataset(pooled)
    if holdout_fraction > 0:
        cases, held = split_cases(dataset.cases, val_fraction=holdout_fraction, seed=seed)
    else:
        cases, held = list(dataset.cases), []
    by_patient: dict[str, list[dict[str, str]]] = {}
    for case in cases:
        by_patient.setdefault(patient_id(case["case_id"]), []).append(case)
    scores = None
    if method == "label-skew":
        scores = {
            p: float(np.mean([lesion_burden(c["label"]) for c in group]))
            for p, group in by_patient.items()
        }
    try:
        groups = split_patients(
            list(by_patient), sites, method=method, alpha=alpha, seed=seed, scores=scores
        )
    except ConfigError as err:
        raise ConfigError(f"pooled folder {pooled}: {err}") from err
    root = Path(root)
    folders = []
    for index, patients in enumerate(groups):
        site_cases = [c for p in patients for c in by_patient[p]]
        shift = (shifts or {}).get(index, ScannerShift())
        folders.append(
            _write_site(root / site_name(index), site_cases, shift, seed=seed, site_index=index)
        )
        logger.info("%s: %d patients, %d cases", site_name(index), len(patients), len(site_cases))
    holdout = _write_site(root / HOLDOUT_NAME, held, ScannerShift(), seed=seed) if held else None
    return SimData(tuple(folders), holdout)


def shifted_federation(
    folders: Sequence[str | Path],
    root: str | Path,
    *,
    shifts: Mapping[int, ScannerShift],
    holdout: str | Path | None,
    seed: int = 0,
) -> SimData:
    """Site folders as given, except those with a shift, which are rebuilt under ``root``."""
    out: list[Path] = []
    for index, folder in enumerate(folders):
        shift = shifts.get(index, ScannerShift())
        if shift.is_identity:
            out.append(Path(folder))
            continue
        cases = load_site_dataset(folder).cases
        out.append(
            _write_site(Path(root) / Path(folder).name, cases, shift, seed=seed, site_index=index)
        )
    return SimData(tuple(out), Path(holdout) if holdout else None)


def link_file(source: str | Path, target: Path) -> None:
    """Make ``target`` a hard link to ``source`` (a copy across file systems).

    A symbolic link would point out of the site folder, which a site refuses unless its
    config sets ``allow-external-links``; a hard link is a file of the folder itself.
    """
    real = Path(source).resolve()
    target.unlink(missing_ok=True)
    try:
        os.link(real, target)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(real, target)


def _claim(site_dir: Path) -> None:
    if site_dir.exists():
        if not (site_dir / _MARKER).is_file():
            if any(site_dir.iterdir()):
                raise DataError(
                    f"{site_dir}: folder exists and was not made by fedmed-sim: choose another "
                    "--out folder"
                )
        else:
            shutil.rmtree(site_dir)
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / _MARKER).write_text("made by fedmed-sim; rebuilt on every run\n", encoding="utf-8")


def _write_site(
    site_dir: Path,
    cases: Sequence[Mapping[str, str]],
    shift: ScannerShift,
    *,
    seed: int,
    site_index: int = 0,
) -> Path:
    _claim(site_dir)
    training = []
    for number, case in enumerate(cases):
        entry = {}
        for key, folder in (("image", "imagesTr"), ("label", "labelsTr")):
            name = f"{case['case_id']}.nii.gz"
            target = site_dir / folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if shift.is_identity:
                link_file(case[key], target)
            entry[key] = f"./{folder}/{name}"
        if not shift.is_identity:
            rng = np.random.default_rng([seed, site_index, number, 61])
            _write_shifted(case, site_dir / entry["image"], site_dir / entry["label"], shift, rng)
        training.append(entry)
    meta = {
        "name": site_dir.name,
        "description": "fedmed-sim site folder",
        "tensorImageSize": "3D",
        "labels": {"0": "background", "1": "lesion"},
        "numTraining": len(training),
        "training": training,
        "test": [],
        "fedmed_sim": {"shift": asdict(shift), "sources": [str(c["image"]) for c in cases]},
    }
    (site_dir / DATASET_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return site_dir


def _write_shifted(
    case: Mapping[str, str],
    image_out: Path,
    label_out: Path,
    shift: ScannerShift,
    rng: np.random.Generator,
) -> None:
    image = read_nifti(case["image"])
    label = read_nifti(case["label"])
    if image.array.shape[:3] != label.array.shape[:3]:
        raise DataError(
            f"{case['label']}: shape {label.array.shape} differs from its image "
            f"{image.array.shape}: re-export the label on the image grid"
        )
    array = image.array.astype(np.float32) + np.float32(shift.hu_offset)
    if shift.noise_sigma > 0:
        array += rng.standard_normal(array.shape, dtype=np.float32) * np.float32(shift.noise_sigma)
    labels = np.asarray(label.array)
    affine = image.affine.copy()
    if shift.spacing_scale != 1.0:
        zoom = [1.0 / shift.spacing_scale] * 2 + [1.0] * (array.ndim - 2)
        shape = array.shape
        array = ndimage.zoom(array, zoom, order=1)
        labels = ndimage.zoom(labels, zoom, order=0)
        for axis in range(2):  # the same field of view on fewer (or more) voxels
            affine[:3, axis] *= shape[axis] / array.shape[axis]
    write_nifti(image_out, array, affine, dtype=np.float32)
    write_nifti(label_out, labels, affine, dtype=np.uint8)
