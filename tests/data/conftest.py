"""Small NIfTI cases and tiny fedmed transforms for the caching-pipeline tests.

The transforms here are deliberately minimal (not the library's) so the dataset tests depend
only on the transform contract in ``fedmed.transforms.base``.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from fedmed.io.nifti import read_nifti, write_nifti
from fedmed.transforms.base import MapTransform, RandomTransform

SHAPE = (12, 10, 8)


class CountingLoad(MapTransform):
    """Read NIfTI files into channel-first tensors; counts its calls (thread-safe)."""

    def __init__(self, keys: str | Sequence[str]) -> None:
        super().__init__(keys)
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        with self._lock:
            self.calls += 1
        d = dict(data)
        for key in self.key_iterator(d):
            volume = read_nifti(d[key])
            d[key] = torch.from_numpy(np.asarray(volume.array, dtype=np.float32))[None]
            d[f"{key}_meta"] = {
                "affine": torch.from_numpy(volume.affine),
                "filename": str(volume.path),
                "history": [],
            }
        return d


class Scale(MapTransform):
    """Multiply by ``factor`` (a parameter that must reach the cache key)."""

    def __init__(self, keys: str | Sequence[str], *, factor: float) -> None:
        super().__init__(keys)
        self.factor = factor

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key] * self.factor
        return d

    def params(self) -> dict[str, Any]:
        return {"factor": self.factor}


class RandAddNoise(RandomTransform):
    """Add a random constant (out of place, as every fedmed random transform must)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key] + self.uniform(0.0, 1.0)
        return d


class RandSamples(RandomTransform):
    """Return ``num_samples`` shallow variants of the item (like a crop by label)."""

    def __init__(self, keys: str | Sequence[str], *, num_samples: int) -> None:
        super().__init__(keys)
        self.num_samples = num_samples

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        out = []
        for sample in range(self.num_samples):
            d = dict(data)
            for key in self.key_iterator(d):
                d[key] = d[key][:, : SHAPE[0] // 2] + sample
            d["sample"] = sample
            out.append(d)
        return out


def mutate_in_place(data: dict[str, Any]) -> dict[str, Any]:
    """An unknown callable that writes into its input (what a careless user transform does)."""
    data["image"].add_(1000.0)
    data["image_meta"]["history"].append("mutated")
    return data


def write_case(folder: Path, index: int, *, offset: float = 0.0) -> dict[str, str]:
    """Write one image/label pair; voxel values are distinct per case and offset."""
    rng = np.random.default_rng(index)
    image = (rng.normal(size=SHAPE) * 100 + 10 * index + offset).astype(np.float32)
    label = (image > image.mean()).astype(np.uint8)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    image_path = write_nifti(folder / f"case{index:02d}_img.nii.gz", image, affine)
    label_path = write_nifti(folder / f"case{index:02d}_seg.nii.gz", label, affine)
    return {"image": str(image_path), "label": str(label_path), "id": f"case{index:02d}"}


@pytest.fixture(scope="session")
def cases(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """Six small image/label cases, written once per session (read-only for tests)."""
    folder = tmp_path_factory.mktemp("nifti")
    return [write_case(folder, i) for i in range(6)]


@pytest.fixture
def own_cases(tmp_path: Path) -> list[dict[str, str]]:
    """Three cases in a per-test folder, for tests that rewrite files."""
    return [write_case(tmp_path / "scans", i) for i in range(3)]


@pytest.fixture
def tiny() -> SimpleNamespace:
    """The test transforms, as a namespace (conftest modules are not imported by tests)."""
    return SimpleNamespace(
        CountingLoad=CountingLoad,
        Scale=Scale,
        RandAddNoise=RandAddNoise,
        RandSamples=RandSamples,
        mutate_in_place=mutate_in_place,
        write_case=write_case,
        SHAPE=SHAPE,
    )
