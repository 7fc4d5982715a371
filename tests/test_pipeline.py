"""fedmed.pipeline and fedmed.patches: settings, cached preprocessing in every cache mode,
patch epochs, loaders, and the case guard."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmed.errors import ConfigError, DataError
from fedmed.io.guard import CLASSES_KEY, GuardSettings
from fedmed.io.nifti import read_nifti, write_nifti
from fedmed.patches import PATCHES_PER_CASE_3D, PatchSamples, augmentation, patch_loader
from fedmed.pipeline import (
    PipelineSettings,
    cached_volumes,
    load_cases,
    preprocessing,
    site_volumes,
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


# The case guard: bad cases are skipped with a warning (or stop the site), never trained on.


def _copy_site(demo_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo_root / "site-A", tmp_path / "site-A"))


def _files(site: Path, index: int) -> tuple[Path, Path]:
    name = f"site-A_patient_{index:03d}.nii.gz"
    return site / "imagesTr" / name, site / "labelsTr" / name


def _put_nan(image: Path) -> None:
    volume = read_nifti(image)
    array = volume.array.astype(np.float32)
    array[3, 4, 5] = np.nan
    write_nifti(image, array, volume.affine)


def _shift(label: Path, mm: float) -> None:
    volume = read_nifti(label)
    affine = volume.affine.copy()
    affine[2, 3] += mm
    write_nifti(label, volume.array, affine)


def _case_ids(volumes) -> list[str]:
    return [volumes[i]["case_id"] for i in range(len(volumes))]


@pytest.mark.parametrize("mode", ["memory", "disk", "none"])
def test_image_with_nan_is_skipped_with_a_warning_naming_it(
    demo_root, tmp_path, caplog, mode
) -> None:
    # Prepare
    site = _copy_site(demo_root, tmp_path)
    image, _ = _files(site, 1)
    _put_nan(image)
    settings = PipelineSettings(cache_mode=mode, cache_dir=tmp_path / "cache")

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmed"):
        volumes = cached_volumes(load_cases([site]), settings)

    # Assert
    assert _case_ids(volumes) == ["site-A_patient_000", "site-A_patient_002"]
    assert f"case site-A_patient_001 skipped (neither trained nor evaluated on): {image}: 1 " in (
        caplog.text
    )
    assert "voxels are NaN or infinite" in caplog.text


def test_label_50_mm_off_its_image_is_skipped_when_cases_are_listed(
    demo_root, tmp_path, caplog
) -> None:
    site = _copy_site(demo_root, tmp_path)
    _, label = _files(site, 0)
    _shift(label, 50.0)

    with caplog.at_level(logging.WARNING, logger="fedmed"):
        cases = load_cases([site])

    assert [c["case_id"] for c in cases] == ["site-A_patient_001", "site-A_patient_002"]
    assert f"{label}: affine differs from its image" in caplog.text
    assert "by up to 50 mm (tolerance 0.001 mm)" in caplog.text
    tolerant = PipelineSettings(guard=GuardSettings(label_affine_tolerance=60.0))
    assert len(load_cases([site], tolerant)) == 3


def test_validation_label_of_255_is_skipped_not_scored(demo_root, tmp_path, caplog) -> None:
    # the probe: a validation label of 255 reported val-dice 1.0
    site = _copy_site(demo_root, tmp_path)
    _, label = _files(site, 2)  # the validation case of seed 0
    volume = read_nifti(label)
    write_nifti(label, np.full(volume.array.shape, 255, np.uint8), volume.affine)

    with caplog.at_level(logging.WARNING, logger="fedmed"):
        train, val = site_volumes([site], PipelineSettings(), val_fraction=0.2, seed=0)

    assert (len(train), len(val)) == (2, 0)
    assert f"{label}: label values [255] are not declared classes [0, 1]" in caplog.text


def test_labels_the_model_cannot_predict_are_refused_when_it_is_known(demo_root, tmp_path):
    site = _copy_site(demo_root, tmp_path)
    meta = json.loads((site / "dataset.json").read_text())
    meta["labels"]["2"] = "consolidation"
    (site / "dataset.json").write_text(json.dumps(meta))
    _, label = _files(site, 0)
    volume = read_nifti(label)
    write_nifti(label, np.where(volume.array > 0, 2, 0).astype(np.uint8), volume.affine)
    cases = load_cases([site], PipelineSettings(guard=GuardSettings(num_classes=2)))

    assert cases[0][CLASSES_KEY] == [0, 1]
    assert len(cached_volumes(cases, PipelineSettings())) == 2
    assert len(cached_volumes(load_cases([site]), PipelineSettings())) == 3


def test_on_bad_case_stop_lists_every_bad_case(demo_root, tmp_path) -> None:
    site = _copy_site(demo_root, tmp_path)
    _put_nan(_files(site, 0)[0])
    _put_nan(_files(site, 2)[0])
    stop = PipelineSettings(guard=GuardSettings(on_bad_case="stop"))

    with pytest.raises(
        DataError, match='2 of 3 cases failed the data check and on-bad-case is "stop"'
    ):
        cached_volumes(load_cases([site], stop), stop)
    (site / "labelsTr" / "site-A_patient_001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case site-A_patient_001: .*label of case \S+ not found"):
        load_cases([site], stop)


def test_site_left_with_fewer_than_two_cases_refuses_to_train(demo_root, tmp_path) -> None:
    site = _copy_site(demo_root, tmp_path)
    _put_nan(_files(site, 0)[0])
    _shift(_files(site, 1)[1], 50.0)

    with pytest.raises(DataError, match=r"only 1 usable case\(s\) \(0 for training, 1 for val"):
        site_volumes([site], PipelineSettings(), val_fraction=0.2, seed=0)


def test_no_usable_case_at_all_is_an_error_naming_the_folder(demo_root, tmp_path) -> None:
    site = _copy_site(demo_root, tmp_path)
    tiny = PipelineSettings(guard=GuardSettings(max_image_bytes=1024))

    with pytest.raises(DataError, match=f"{site}: none of its 3 cases passed the data check"):
        load_cases([site], tiny)
    assert preprocessing(tiny).transforms[0].max_bytes == 1024


def test_guard_runs_when_cases_are_cached_not_per_epoch(demo_root, tmp_path) -> None:
    site = _copy_site(demo_root, tmp_path)
    volumes = cached_volumes(load_cases([site]), PipelineSettings())
    shutil.rmtree(site)  # nothing is read again: the checks ran once, when caching

    samples = PatchSamples(volumes, (16, 16), seed=0)
    for _ in range(2):
        assert all(samples[i]["image"].shape == (1, 16, 16) for i in range(len(samples)))


def test_disk_cache_keeps_the_verdict_until_the_file_changes(demo_root, tmp_path) -> None:
    site = _copy_site(demo_root, tmp_path)
    image, _ = _files(site, 1)
    clean = image.read_bytes()
    _put_nan(image)
    settings = PipelineSettings(cache_mode="disk", cache_dir=tmp_path / "cache")
    assert len(cached_volumes(load_cases([site]), settings)) == 2
    assert len(cached_volumes(load_cases([site]), settings)) == 2  # from the cache

    image.write_bytes(clean)

    assert len(cached_volumes(load_cases([site]), settings)) == 3


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"on_bad_case": "ignore"}, "on-bad-case 'ignore' is unknown: use one of skip, stop"),
        ({"max_image_bytes": 0}, "max-image-gib 0 must be > 0"),
        ({"label_affine_tolerance": -1.0}, r"label-affine-tolerance -1.0 must be >= 0 \(mm\)"),
        ({"label_affine_tolerance": math.nan}, "label-affine-tolerance nan must be >= 0"),
        ({"num_classes": 1}, "num-classes 1 must be >= 2"),
    ],
    ids=["policy", "memory", "tolerance", "nan-tolerance", "classes"],
)
def test_guard_settings_refuse_invalid_values(options, match) -> None:
    with pytest.raises(ConfigError, match=match):
        GuardSettings(**options)


def test_guard_settings_from_the_node_config(caplog) -> None:
    node = {"on-bad-case": "stop", "max-image-gib": 4, "label-affine-tolerance": 2.0,
            "allow-external-links": True, "site": "A"}  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="fedmed"):
        guard = GuardSettings.from_node_config(node, num_classes=3)

    assert guard == GuardSettings(
        max_image_bytes=4 * 2**30,
        label_affine_tolerance=2.0,
        on_bad_case="stop",
        allow_external_links=True,
        num_classes=3,
    )
    assert "labels up to 2 mm off their image are trained on" in caplog.text
    assert GuardSettings.from_node_config({}) == GuardSettings()
    with pytest.raises(ConfigError, match="node config allow-external-links = 'yes' must be bool"):
        GuardSettings.from_node_config({"allow-external-links": "yes"})
