"""Demo data: chest-CT-like phantoms with lesion labels, one folder per simulated hospital.

Each volume is a :class:`~fedmed.data.phantom.ChestPhantom` in Hounsfield units: air outside
the body (-1000), soft tissue (~40) with a fat rim (~-100), two lungs (~-850) with branching
vessels (~40), and lesions inside the lungs: fuzzy ground-glass opacities (-700..-400) and
consolidations (-100..40). Label 1 = lesion (both kinds), 0 = background.

Sites differ like scanners (:class:`ScannerProfile`): noise, HU calibration offset, in-plane
spacing and slice thickness (the grid shape is fixed, so a finer spacing is a smaller field of
view that crops the body and a coarser one zooms out; the affine records the spacing), int16
storage with or without ``scl_slope``/``scl_inter``, and annotation quality. At a site with
``label_noise = p`` (site-C by default) each lesion's label is, with probability p, dilated
(drawn 30 % larger), eroded (30 % smaller) or missed (left out), one of the three at random;
the image is unchanged and ``DemoCase.true_label`` keeps the clean label. Such a site's folder
also holds the clean labels in ``labelsTrClean/`` (same file names as ``labelsTr/``, not listed
in ``dataset.json``, never trained on): the site's validation scores its model against them
too (``val-dice-clean``, :class:`fedmed.task.SiteTask`), so the report shows how well the
model segments that site's scans, not only how well it reproduces the noise.

Everything is deterministic from ``seed``: case ``i`` of site ``s`` comes from its own
``SeedSequence([seed, s, i])``, so adding cases or sites never changes existing ones, and the
patient's anatomy does not depend on the scanner (the same patient can be "scanned" by two
profiles). The server's held-out set (``OUT/holdout``) comes from a neutral scanner.

Example:
    >>> sites = generate_demo_federation("demo/data", sites=3, cases=6, seed=0)
    >>> [p.name for p in sites]
    ['site-A', 'site-B', 'site-C']
    >>> case = generate_case(seed=0, site_index=0, case_index=0, profile=site_profile(0))
    >>> case.image.shape, case.spacing
    ((64, 64, 32), (5.9375, 5.9375, 10.0))
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from fedmed.data.phantom import ChestPhantom, VoxelGrid
from fedmed.errors import ConfigError, DataError
from fedmed.io.msd import DATASET_JSON
from fedmed.io.nifti import write_nifti

__all__ = [
    "CLEAN_LABELS_DIRNAME",
    "DEFAULT_SHAPE",
    "HOLDOUT_DIRNAME",
    "HOLDOUT_PROFILE",
    "NOMINAL_FOV_MM",
    "SITE_PROFILES",
    "DemoCase",
    "ScannerProfile",
    "generate_case",
    "generate_demo_federation",
    "site_name",
    "site_profile",
    "write_demo_site",
]

logger = logging.getLogger(__name__)

DEFAULT_SHAPE = (64, 64, 32)
NOMINAL_FOV_MM = (380.0, 380.0, 320.0)  # field of view of a neutral scanner, any grid shape
HOLDOUT_DIRNAME = "holdout"
CLEAN_LABELS_DIRNAME = "labelsTrClean"  # fedmed.task.CLEAN_LABELS_DIR reads it
_HOLDOUT_SITE_INDEX = 100_000  # seeds the held-out cases apart from every site's
_HU_RANGE = (-1024.0, 3071.0)

CaseCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner and annotators differ from the others.

    ``noise_sigma``: std of the added noise (HU). ``hu_offset``: calibration offset added to
    every voxel (HU). ``inplane_scale`` / ``slice_scale``: multiply the nominal in-plane spacing
    and slice thickness (``NOMINAL_FOV_MM / shape``); below 1 the field of view shrinks (body
    cropped), above 1 it grows. ``label_noise``: probability that a lesion's label is dilated,
    eroded or missed. ``scl_slope`` / ``scl_inter``: int16 storage, HU = stored * slope + inter
    (1, 0 stores plain HU).

    Example:
        >>> ScannerProfile("old scanner", noise_sigma=35.0, slice_scale=2.0)
    """

    name: str = "neutral"
    noise_sigma: float = 15.0
    hu_offset: float = 0.0
    inplane_scale: float = 1.0
    slice_scale: float = 1.0
    label_noise: float = 0.0
    scl_slope: float = 1.0
    scl_inter: float = 0.0

    def __post_init__(self) -> None:
        if self.noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0, got {self.noise_sigma}")
        if self.inplane_scale <= 0 or self.slice_scale <= 0:
            raise ValueError(
                f"inplane_scale and slice_scale must be > 0, got "
                f"{self.inplane_scale} and {self.slice_scale}"
            )
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], got {self.label_noise}")
        if self.scl_slope <= 0:
            raise ValueError(f"scl_slope must be > 0, got {self.scl_slope}")
        low = (_HU_RANGE[0] - self.scl_inter) / self.scl_slope
        high = (_HU_RANGE[1] - self.scl_inter) / self.scl_slope
        if low < -32768 or high > 32767:
            raise ValueError(
                f"scl_slope={self.scl_slope}, scl_inter={self.scl_inter} cannot store "
                f"{_HU_RANGE} HU in int16; use a larger slope"
            )


SITE_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile("A: low noise, nominal geometry, plain HU", noise_sigma=12.0),
    ScannerProfile(
        "B: noisy, +30 HU, zoomed in (cropped body), thick slices, int16 + 1024 offset",
        noise_sigma=30.0,
        hu_offset=30.0,
        inplane_scale=0.8,
        slice_scale=1.6,
        scl_inter=-1024.0,
    ),
    ScannerProfile(
        "C: -25 HU, zoomed out, thin slices, half-HU int16, noisy labels",
        noise_sigma=20.0,
        hu_offset=-25.0,
        inplane_scale=1.15,
        slice_scale=0.8,
        label_noise=0.6,
        scl_slope=0.5,
        scl_inter=-1024.0,
    ),
)
HOLDOUT_PROFILE = ScannerProfile("holdout: neutral reference scanner", noise_sigma=15.0)


@dataclass(frozen=True)
class DemoCase:
    """One generated volume: ``image`` in HU (float32), ``label`` as annotated at the site
    (uint8, label noise applied), ``true_label`` without label noise, and the ``affine``."""

    image: np.ndarray
    label: np.ndarray
    true_label: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm."""
        sx, sy, sz = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(sx), float(sy), float(sz)


def site_name(index: int) -> str:
    """``0 -> 'site-A'``, ``25 -> 'site-Z'``, ``26 -> 'site-AA'`` (spreadsheet columns)."""
    if index < 0:
        raise ValueError(f"site index must be >= 0, got {index}")
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return f"site-{letters}"


def site_profile(index: int) -> ScannerProfile:
    """The default scanner of site ``index``: :data:`SITE_PROFILES` for the first three, then
    profiles drawn from the index (not the seed), label noise at every third site."""
    if index < len(SITE_PROFILES):
        return SITE_PROFILES[index]
    rng = np.random.default_rng([index, 7])
    slope, inter = ((1.0, -1024.0), (1.0, 0.0), (0.5, -1024.0))[index % 3]
    return ScannerProfile(
        f"{site_name(index)[5:]}: drawn scanner",
        noise_sigma=round(float(rng.uniform(10, 35)), 1),
        hu_offset=round(float(rng.uniform(-30, 30)), 1),
        inplane_scale=round(float(rng.uniform(0.85, 1.15)), 3),
        slice_scale=round(float(rng.uniform(0.8, 1.6)), 3),
        label_noise=0.5 if index % 3 == 2 else 0.0,
        scl_slope=slope,
        scl_inter=inter,
    )


def generate_case(
    *,
    seed: int,
    site_index: int,
    case_index: int,
    profile: ScannerProfile,
    shape: Sequence[int] = DEFAULT_SHAPE,
) -> DemoCase:
    """One phantom as ``profile``'s scanner sees it; deterministic in its arguments."""
    shape = _check_shape(shape)
    anatomy_ss, noise_ss, label_ss = np.random.SeedSequence([seed, site_index, case_index]).spawn(3)
    spacing = tuple(
        fov / n * scale
        for fov, n, scale in zip(
            NOMINAL_FOV_MM,
            shape,
            (profile.inplane_scale, profile.inplane_scale, profile.slice_scale),
            strict=True,
        )
    )
    grid = VoxelGrid(shape, spacing)
    phantom = ChestPhantom(grid, np.random.default_rng(anatomy_ss))
    label_rng = np.random.default_rng(label_ss)
    image, true_label, label = phantom.render(profile.label_noise, label_rng)
    image += np.float32(profile.hu_offset)
    if profile.noise_sigma > 0:
        noise = np.random.default_rng(noise_ss).standard_normal(shape, dtype=np.float32)
        noise *= np.float32(profile.noise_sigma)
        image += noise
    np.clip(image, *_HU_RANGE, out=image)
    return DemoCase(image=image, label=label, true_label=true_label, affine=grid.affine)


def write_demo_site(
    site_dir: str | Path,
    *,
    profile: ScannerProfile,
    site_index: int,
    cases: int,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    on_case: CaseCallback | None = None,
) -> Path:
    """Write ``cases`` phantoms and ``dataset.json`` (MSD layout) into ``site_dir``.

    Images are int16 NIfTI with the profile's ``scl_slope``/``scl_inter``, labels uint8; with
    label noise, the clean labels in ``labelsTrClean/``.
    An existing demo folder is refreshed (files from an earlier, larger run are removed); any
    other non-empty folder is refused with :class:`DataError`. ``on_case(site, done, total)``
    is called after each case.
    """
    site_dir = Path(site_dir)
    if cases < 1:
        raise ConfigError(f"{site_dir}: need at least one case per site, got {cases}")
    _claim_folder(site_dir)
    name = site_dir.name
    training = []
    for index in range(cases):
        case = generate_case(
            seed=seed, site_index=site_index, case_index=index, profile=profile, shape=shape
        )
        case_id = f"{name}_patient_{index:03d}"
        _write_ct(site_dir / "imagesTr" / f"{case_id}.nii.gz", case.image, case.affine, profile)
        write_nifti(
            site_dir / "labelsTr" / f"{case_id}.nii.gz", case.label, case.affine, dtype=np.uint8
        )
        if profile.label_noise > 0:  # what the annotators should have drawn: validation only
            clean = site_dir / CLEAN_LABELS_DIRNAME / f"{case_id}.nii.gz"
            write_nifti(clean, case.true_label, case.affine, dtype=np.uint8)
        training.append(
            {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}
        )
        logger.debug("%s: wrote case %d/%d (%s)", name, index + 1, cases, case_id)
        if on_case is not None:
            on_case(name, index + 1, cases)
    _remove_stale(site_dir, {Path(t["image"]).name for t in training})
    if profile.label_noise == 0:  # a folder rewritten with clean annotators keeps none
        shutil.rmtree(site_dir / CLEAN_LABELS_DIRNAME, ignore_errors=True)
    meta = {
        "name": name,
        "description": "fedmed demo: synthetic chest-CT-like phantoms, no patient data",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "lesion"},
        "numTraining": cases,
        "numTest": 0,
        "training": training,
        "test": [],
        "fedmed_demo": {
            "seed": seed,
            "site_index": site_index,
            "shape": list(shape),
            "scanner": asdict(profile),
            "label_noise": "each lesion's label dilated, eroded or missed with probability "
            "scanner.label_noise; the clean labels are in labelsTrClean/ (validation only)",
        },
    }
    tmp = site_dir / f".{DATASET_JSON}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tmp.replace(site_dir / DATASET_JSON)
    return site_dir


def generate_demo_federation(
    out: str | Path,
    *,
    sites: int = 3,
    cases: int = 6,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    holdout: int = 4,
    profiles: Sequence[ScannerProfile] | None = None,
    on_case: CaseCallback | None = None,
) -> list[Path]:
    """Write ``OUT/site-A``, ``OUT/site-B``, ... and ``OUT/holdout``; return the site folders.

    ``profiles`` replaces the default scanners (one per site); ``holdout=0`` writes no held-out
    set (otherwise it is at ``OUT / HOLDOUT_DIRNAME``).
    """
    if sites < 1:
        raise ConfigError(f"need at least one site, got sites={sites}")
    if holdout < 0:
        raise ConfigError(f"holdout must be >= 0, got {holdout}")
    if profiles is not None and len(profiles) != sites:
        raise ConfigError(f"got {len(profiles)} scanner profiles for {sites} sites")
    out = Path(out)
    shape = _check_shape(shape)
    folders = []
    for index in range(sites):
        profile = profiles[index] if profiles is not None else site_profile(index)
        folders.append(
            write_demo_site(
                out / site_name(index),
                profile=profile,
                site_index=index,
                cases=cases,
                seed=seed,
                shape=shape,
                on_case=on_case,
            )
        )
    if holdout:
        write_demo_site(
            out / HOLDOUT_DIRNAME,
            profile=HOLDOUT_PROFILE,
            site_index=_HOLDOUT_SITE_INDEX,
            cases=holdout,
            seed=seed,
            shape=shape,
            on_case=on_case,
        )
    return folders


def _write_ct(path: Path, image: np.ndarray, affine: np.ndarray, profile: ScannerProfile) -> None:
    stored = np.rint((image - np.float32(profile.scl_inter)) / np.float32(profile.scl_slope))
    nifti = nib.Nifti1Image(stored.astype(np.int16), affine)
    nifti.header.set_sform(affine, code=1)
    nifti.header.set_qform(affine, code=1)
    nifti.header.set_xyzt_units("mm")
    nifti.header.set_slope_inter(profile.scl_slope, profile.scl_inter)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    try:
        nib.save(nifti, tmp)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot write the file ({err})") from err


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(n) < 8 for n in shape):
        raise ConfigError(f"demo shape must be three sizes of at least 8 voxels, got {shape}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _claim_folder(site_dir: Path) -> None:
    if not site_dir.exists() or not any(site_dir.iterdir()):
        return
    try:
        meta = json.loads((site_dir / DATASET_JSON).read_text(encoding="utf-8"))
        is_demo = isinstance(meta, dict) and "fedmed_demo" in meta
    except (OSError, ValueError):
        is_demo = False
    if not is_demo:
        raise DataError(
            f"{site_dir}: exists and is not a fedmed demo folder; refusing to write demo data "
            "into it, choose an empty or new output folder"
        )


def _remove_stale(site_dir: Path, keep: set[str]) -> None:
    for sub in ("imagesTr", "labelsTr", CLEAN_LABELS_DIRNAME):
        for path in (site_dir / sub).glob("*.nii*"):
            if path.name not in keep:
                path.unlink()
