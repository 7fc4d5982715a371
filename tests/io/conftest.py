"""A small clean MSD site, written once per session and copied for each test that breaks it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedmed.io.nifti import write_nifti

SITE_SHAPE = (16, 16, 8)
SITE_AFFINE = np.array(
    [[0.8, 0, 0, -6.0], [0, 0.8, 0, -6.0], [0, 0, 2.5, -10.0], [0, 0, 0, 1]], dtype=np.float64
)
SITE_IDS = ("p01", "p02", "p03")


@pytest.fixture(scope="session")
def clean_site_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean") / "site-T"
    rng = np.random.default_rng(0)
    training = []
    for case_id in SITE_IDS:
        image = rng.normal(-500, 200, SITE_SHAPE).astype(np.float32)  # incompressible
        label = (rng.uniform(size=SITE_SHAPE) > 0.8).astype(np.uint8)
        write_nifti(root / "imagesTr" / f"{case_id}.nii.gz", image, SITE_AFFINE)
        write_nifti(root / "labelsTr" / f"{case_id}.nii.gz", label, SITE_AFFINE)
        training.append(
            {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}
        )
    meta = {"name": "T", "labels": {"0": "background", "1": "lesion"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


@pytest.fixture
def site(clean_site_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the clean site (``site-T``: p01..p03, 16x16x8, classes {0, 1})."""
    return Path(shutil.copytree(clean_site_template, tmp_path / "site-T"))
