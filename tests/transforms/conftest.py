"""Small NIfTI cases with non-trivial geometry, written once per session."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmed.transforms import LoadImaged, ScaleIntensityRanged

SHAPE = (20, 16, 12)

# LPS: x runs to the patient's left (-R), y to posterior (-A); anisotropic voxels
LPS_AFFINE = np.array(
    [
        [-0.8, 0.0, 0.0, 40.0],
        [0.0, -0.7, 0.0, 30.0],
        [0.0, 0.0, 2.5, -60.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
# array axes stored as (S, R, P): a permuted, partly flipped orientation
PERMUTED_AFFINE = np.array(
    [
        [0.0, 0.9, 0.0, -20.0],
        [0.0, 0.0, -0.6, 15.0],
        [2.0, 0.0, 0.0, -30.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def phantom(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (HU, air -1000 around a body) and its label (lesion 1, vessel 2)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    image = np.full(shape, -1000.0, dtype=np.float32)
    body = radius < 0.8
    image[body] = 40.0 + 30.0 * grid[0][body] + rng.normal(0, 5, body.sum())
    lesion = np.sqrt(((grid - np.array([0.3, 0.1, 0.0])[:, None, None, None]) ** 2).sum(0)) < 0.25
    vessel = (np.abs(grid[0] + 0.3) < 0.12) & (np.abs(grid[1]) < 0.12) & body
    image[lesion] = 120.0
    label = np.zeros(shape, dtype=np.uint8)
    label[lesion] = 1
    label[vessel] = 2
    return image.astype(np.float32), label


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(array, affine)
    image.header.set_sform(affine, code=1)
    image.header.set_qform(affine, code=1)
    nib.save(image, path)
    return path


@pytest.fixture(scope="session")
def lps_affine() -> np.ndarray:
    """The affine of the LPS case."""
    return LPS_AFFINE.copy()


@pytest.fixture(scope="session")
def case_shape() -> tuple[int, ...]:
    """The spatial shape of every case."""
    return SHAPE


@pytest.fixture(scope="session")
def nifti_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """``{"lps": {"image": path, "label": path}, "permuted": {...}}``."""
    root = tmp_path_factory.mktemp("transforms_nifti")
    cases = {}
    for seed, (name, affine) in enumerate([("lps", LPS_AFFINE), ("permuted", PERMUTED_AFFINE)]):
        image, label = phantom(SHAPE, seed)
        cases[name] = {
            "image": _write(root / f"{name}_img.nii.gz", image, affine),
            "label": _write(root / f"{name}_seg.nii.gz", label, affine),
        }
    return cases


@pytest.fixture
def item(nifti_cases: dict[str, dict[str, Path]]) -> dict:
    """The LPS case loaded and windowed to [0, 1] (air is exactly 0)."""
    loaded = LoadImaged(("image", "label"))(nifti_cases["lps"])
    return ScaleIntensityRanged("image", a_min=-1000.0, a_max=400.0)(loaded)


@pytest.fixture
def permuted_item(nifti_cases: dict[str, dict[str, Path]]) -> dict:
    """The permuted-axes case, loaded (HU)."""
    return LoadImaged(("image", "label"))(nifti_cases["permuted"])
