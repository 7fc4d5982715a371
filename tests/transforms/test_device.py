"""The same pipeline on a GPU gives the CPU result (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from fedmed.transforms import (
    Compose,
    CropForegroundd,
    FgBgToIndicesd,
    RandCropByPosNegLabeld,
    RandElasticd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    Spacingd,
    SpatialPadd,
    invert,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
KEYS = ("image", "label")


def _to(item: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in item.items()}


def test_pipeline_runs_on_cuda_like_on_cpu(item):
    deterministic = Compose(
        [
            Spacingd(KEYS, (0.4, 0.35, 1.25)),
            CropForegroundd(KEYS, "image"),
            SpatialPadd(KEYS, (40, 40, 16)),
            FgBgToIndicesd("label"),
        ]
    )
    random = Compose(
        [
            RandCropByPosNegLabeld(KEYS, "label", (16, 16, 8), num_samples=2),
            RandFlipd(KEYS, prob=0.5),
            RandRotate90d(KEYS, prob=0.5),
            RandElasticd(KEYS, prob=1.0),
            RandGaussianNoised("image", prob=1.0),
        ]
    )

    on_cpu = deterministic(item)
    on_gpu = deterministic(_to(item, "cuda"))
    samples = random.set_random_state(0)(on_gpu)

    assert on_gpu["image"].is_cuda and on_gpu["label"].dtype == torch.uint8
    torch.testing.assert_close(on_gpu["image"].cpu(), on_cpu["image"], atol=1e-4, rtol=0)
    assert torch.equal(on_gpu["label"].cpu(), on_cpu["label"])
    assert all(s["image"].is_cuda and s["image"].shape == (1, 16, 16, 8) for s in samples)
    back = invert(on_gpu, "label")
    assert back["label"].shape == item["label"].shape
    assert torch.equal(back["label"].cpu(), item["label"])
