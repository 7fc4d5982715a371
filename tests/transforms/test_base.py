from __future__ import annotations

import json

import pytest
import torch

import fedmed.transforms as transforms
from fedmed.transforms import (
    Compose,
    FgBgToIndicesd,
    Flipd,
    InvertibleTransform,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    ScaleIntensityRanged,
    SpatialPadd,
)

KEYS = ("image", "label")


def test_public_api_is_pinned():
    assert sorted(transforms.__all__) == sorted(
        [
            "LABEL_DTYPE", "Compose", "CropForegroundd", "Elasticd", "FgBgToIndicesd", "Flipd",
            "GaussianNoised", "Inverted", "InvertibleTransform", "LoadImaged", "MapTransform",
            "NormalizeIntensityd", "Orientationd", "RandCropByPosNegLabeld", "RandElasticd",
            "RandFlipd",
            "RandGaussianNoised", "RandRotate90d", "RandScaleIntensityd", "RandShiftIntensityd",
            "RandomTransform", "Rotate90d", "ScaleIntensityRanged", "ScaleIntensityd",
            "ShiftIntensityd", "Spacingd", "SpatialCropd", "SpatialPadd", "elastic_deform",
            "fg_bg_indices", "invert", "invert_to_original", "invert_with_meta",
            "is_deterministic", "save_prediction", "undo_last_step",
        ]
    )  # fmt: skip
    for name in transforms.__all__:
        assert hasattr(transforms, name), name
    exported = {getattr(transforms, n) for n in transforms.__all__}
    for cls in InvertibleTransform.registry.values():
        assert cls in exported, f"{cls.__name__} is invertible but not exported"


def test_split_puts_sampling_after_the_cacheable_prefix():
    pipeline = Compose(
        [
            LoadImaged(KEYS),
            Orientationd(KEYS),
            ScaleIntensityRanged("image", a_min=-1000.0, a_max=400.0),
            FgBgToIndicesd("label"),
            RandCropByPosNegLabeld(KEYS, "label", (8, 8, 8), num_samples=4),
            RandFlipd(KEYS, prob=0.5),
        ]
    )

    prefix, rest = pipeline.split_deterministic()

    assert [type(t).__name__ for t in prefix.transforms] == [
        "LoadImaged",
        "Orientationd",
        "ScaleIntensityRanged",
        "FgBgToIndicesd",
    ]
    assert len(rest) == 2
    # the prefix's config is JSON (it is hashed into cache keys) and changes with a setting
    first = json.dumps(prefix.config())
    changed = Compose(
        [*prefix.transforms[:2], ScaleIntensityRanged("image", a_min=-900.0, a_max=400.0)]
    )
    assert json.dumps(changed.config()) != first


def test_inverse_transform_has_a_json_config():
    inverse = SpatialPadd(KEYS, (8, 8, 8)).inverse()

    assert json.loads(json.dumps(inverse.config()))["inverse_of"]["name"] == "SpatialPadd"
    assert not inverse.is_random


def test_monai_dict_transforms_mix_into_a_compose(item):
    monai_transforms = pytest.importorskip("monai.transforms")
    pipeline = Compose(
        [
            Flipd(KEYS, 0),
            monai_transforms.RandFlipd(KEYS, prob=1.0, spatial_axis=0),
            RandRotate90d(KEYS, prob=0.0),
        ]
    )

    prefix, rest = pipeline.split_deterministic()
    out = pipeline(item)

    assert len(prefix) == 1 and len(rest) == 2
    torch.testing.assert_close(
        torch.as_tensor(out["image"]).as_subclass(torch.Tensor), item["image"]
    )


def test_monai_transform_can_follow_fedmed_patch_sampling(item):
    monai_transforms = pytest.importorskip("monai.transforms")
    samples = RandCropByPosNegLabeld(KEYS, "label", (8, 8, 6), num_samples=2)(item)

    flipped = [monai_transforms.RandFlipd(KEYS, prob=1.0, spatial_axis=1)(s) for s in samples]

    for before, after in zip(samples, flipped, strict=True):
        assert torch.equal(
            torch.as_tensor(after["image"]).as_subclass(torch.Tensor), before["image"].flip(2)
        )


def test_compose_runs_later_transforms_on_every_sampled_patch(item):
    from fedmed.transforms import RandCropByPosNegLabeld

    pipeline = Compose(
        [
            RandCropByPosNegLabeld(KEYS, "label", (8, 8, 6), num_samples=3),
            RandCropByPosNegLabeld(KEYS, "label", (4, 4, 4), num_samples=2),
            Flipd(KEYS, 0),
        ]
    )

    samples = pipeline(item)

    assert len(samples) == 6
    assert all(s["image"].shape == (1, 4, 4, 4) for s in samples)
    assert all(s["image_meta"]["history"][-1]["name"] == "Flipd" for s in samples)
