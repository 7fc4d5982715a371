"""fedmed.pipeline: settings, cached preprocessing in every cache mode, patch epochs, loaders."""

from __future__ import annotations

import pytest
import torch

from fedmed.errors import ConfigError, DataError
from fedmed.pipeline import (
    PATCHES_PER_CASE_3D,
    PatchSamples,
    PipelineSettings,
    augmentation,
    cached_volumes,
    load_cases,
    patch_loader,
    preprocessing,
)
from fedmed.security.encryption import EncryptionKey
from fedmed.transforms import Spacingd

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cases(demo_root):
    return load_cases([demo_root / "site-A"])


@pytest.fixture(scope="module")
def volumes(cases):
    return cached_volumes(cases, PipelineSettings())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"cache_mode": "ram"}, "cache-mode 'ram' is unknown"),
        ({"cache_mode": "disk"}, "cache-mode 'disk' needs a cache-dir"),
        ({"hu_window": (400.0, -1000.0)}, "hu-window .* high > low"),
        ({"hu_window": (400.0,)}, "hu-window \\(400.0,\\) must be \\(low, high\\)"),
        ({"pixdim": (1.0, 0.0, 1.0)}, "pixdim .* positive"),
        ({"num_workers": 0}, "num-workers 0 must be >= 1"),
        ({"intensity": "minmax"}, "intensity 'minmax' is unknown: use ct-window, zscore"),
    ],
    ids=["mode", "disk-without-dir", "window", "window-length", "pixdim", "workers", "intensity"],
)
def test_settings_refuse_invalid_values(options, match):
    with pytest.raises(ConfigError, match=match):
        PipelineSettings(**options)


def test_preprocessing_resamples_only_with_pixdim():
    plain = preprocessing(PipelineSettings())
    resampled = preprocessing(PipelineSettings(pixdim=(1.0, 1.0, 2.0)))
    assert not any(isinstance(t, Spacingd) for t in plain.transforms)
    assert any(isinstance(t, Spacingd) for t in resampled.transforms)


@pytest.mark.parametrize("intensity", ["zscore", "zscore-nonzero"])
def test_an_mr_pipeline_z_scores_instead_of_windowing(cases, intensity):
    item = preprocessing(PipelineSettings(intensity=intensity))(cases[0])
    image = item["image"]
    values = image[image != 0] if intensity == "zscore-nonzero" else image
    assert abs(float(values.mean())) < 1e-4
    assert float(values.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    assert float(image.min()) < 0.0  # no [0, 1] window


def test_volumes_are_ras_windowed_with_label_indices(volumes):
    item = volumes[0]
    assert item["image"].shape == (1, 32, 32, 16)
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
    fg = item["label_fg_indices"]
    assert len(fg) == int((item["label"] > 0).sum())


def test_load_cases_pools_folders_with_unique_ids(demo_root):
    pooled = load_cases([demo_root / "site-A", demo_root / "site-A"])
    ids = [c["case_id"] for c in pooled]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert ids[3] == f"site-A/{ids[0]}"
    with pytest.raises(ConfigError, match="no data folder given"):
        load_cases([])


def test_disk_cache_writes_entries_and_encrypted_mode_needs_a_key(cases, tmp_path, monkeypatch):
    # Prepare
    monkeypatch.delenv("FEDMED_CACHE_KEY", raising=False)
    plain = PipelineSettings(cache_mode="disk", cache_dir=tmp_path / "plain")
    sealed = PipelineSettings(
        cache_mode="disk-encrypted",
        cache_dir=tmp_path / "sealed",
        cache_key=EncryptionKey.generate().to_text(),
    )
    # Execute
    disk = cached_volumes(cases[:1], plain)
    encrypted = cached_volumes(cases[:1], sealed)
    # Assert
    assert [p.suffix for p in (tmp_path / "plain" / "volumes").iterdir()] == [".safetensors"]
    assert [p.name.endswith(".enc") for p in (tmp_path / "sealed" / "volumes").iterdir()] == [True]
    assert torch.equal(disk[0]["image"], encrypted[0]["image"])
    with pytest.raises(ConfigError, match="'disk-encrypted' needs a key: set FEDMED_CACHE_KEY"):
        cached_volumes(cases[:1], PipelineSettings(cache_mode="disk-encrypted", cache_dir=tmp_path))


def test_2d_epoch_has_one_sample_per_slice_padded_to_the_patch(volumes):
    samples = PatchSamples(volumes, (48, 40), seed=0)
    assert len(samples) == 16 * len(volumes)
    sample = samples[5]
    assert sample["image"].shape == (1, 48, 40) and sample["label"].shape == (1, 48, 40)
    assert samples.case_of(17) == 1
    assert "label_fg_indices" in volumes[0]  # the cached item is untouched


def test_3d_epoch_has_fixed_patches_per_case(volumes):
    samples = PatchSamples(volumes, (16, 16, 8), seed=0)
    assert len(samples) == PATCHES_PER_CASE_3D * len(volumes)
    assert samples[0]["image"].shape == (1, 16, 16, 8)


def test_patches_centre_on_lesions_half_the_time(volumes):
    samples = PatchSamples(volumes, (8, 8), seed=1)
    with_lesion = sum(bool((samples[i]["label"] > 0).any()) for i in range(len(samples)))
    assert 0.35 * len(samples) <= with_lesion <= 0.9 * len(samples)


def test_loader_batches_are_reproducible_for_a_seed(volumes):
    def first_batches(seed):
        loader = patch_loader(volumes, patch_size=(16, 16), batch_size=4, seed=seed)
        return [b["image"] for _, b in zip(range(3), loader, strict=False)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert a[0].shape == (4, 1, 16, 16)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert len(patch_loader(volumes, patch_size=(16, 16), batch_size=4, seed=0)) == 12


def test_augmentation_rejects_bad_patch_sizes_and_empty_sites():
    with pytest.raises(ConfigError, match="patch-size \\(16,\\) must be 2"):
        augmentation((16,), seed=0)
    with pytest.raises(DataError, match="no training cases"):
        PatchSamples([], (16, 16), seed=0)
