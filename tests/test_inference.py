"""Sliding-window and slice-wise inference, cross-checked against MONAI's sliding window."""

from __future__ import annotations

import pytest
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference as monai_sliding_window
from torch import nn

from fedmed.inference import (
    gaussian_importance_map,
    slicewise_inference,
    sliding_window_inference,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _conv(spatial_dims: int, in_channels: int = 2, out_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    conv = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2]
    return conv(in_channels, out_channels, 3, padding=1).eval()


CASES = {
    "2d": ((2, 2, 37, 29), (16, 12)),
    "2d-roi-larger": ((1, 2, 10, 29), (16, 12)),
    "3d": ((2, 2, 14, 15, 9), (8, 10, 6)),
    "3d-roi-larger": ((1, 2, 5, 21, 11), (8, 10, 16)),
    "3d-whole-axis": ((1, 2, 12, 9, 7), (8, -1, 4)),
}


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.25, 0.6])
def test_matches_monai_sliding_window(case: str, mode: str, overlap: float) -> None:
    shape, roi = CASES[case]
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    model = _conv(len(shape) - 2)
    with torch.no_grad():
        expected = monai_sliding_window(
            inputs, roi, 3, model, overlap=overlap, mode=mode, sigma_scale=0.125
        )
    ours = sliding_window_inference(inputs, roi, model, sw_batch_size=3, overlap=overlap, mode=mode)
    assert ours.shape == (shape[0], 3, *shape[2:])
    torch.testing.assert_close(ours, torch.as_tensor(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("roi", [(7, 5), (16, 16, 9)], ids=["2d", "3d"])
def test_gaussian_map_matches_monai(roi: tuple[int, ...]) -> None:
    ours = gaussian_importance_map(roi, sigma_scale=0.125)
    ref = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125)
    assert ours.shape == roi
    torch.testing.assert_close(ours, ref)
    assert ours.max() <= 1.0


def test_blending_restores_an_identity_predictor_exactly() -> None:
    inputs = torch.randn(2, 1, 23, 17, 9)
    for mode in ("constant", "gaussian"):
        out = sliding_window_inference(inputs, (8, 8, 8), lambda x: x, overlap=0.5, mode=mode)
        torch.testing.assert_close(out, inputs)


def test_windows_are_batched_and_sized_as_roi() -> None:
    seen: list[tuple[int, ...]] = []

    def predictor(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return x

    # 20 = windows at 0, 6, 12 (step int(8 * 0.75) = 6); 10: 0, 2 -> 3 * 2 = 6 per item.
    sliding_window_inference(torch.zeros(2, 1, 20, 10), (8, 8), predictor, sw_batch_size=4)
    assert seen == [(4, 1, 8, 8), (4, 1, 8, 8), (4, 1, 8, 8)]


def test_output_channels_follow_the_predictor_and_stay_on_input_device() -> None:
    inputs = torch.randn(1, 2, 12, 12)
    out = sliding_window_inference(inputs, 8, _conv(2, 2, 5), device="cpu")
    assert out.shape == (1, 5, 12, 12)
    assert out.device == inputs.device


def test_predictor_that_changes_window_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="must return one"):
        sliding_window_inference(torch.zeros(1, 1, 12, 12), 8, lambda x: x[..., :4])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"overlap": 1.0}, r"overlap must be in \[0, 1\)"),
        ({"mode": "linear"}, "mode must be 'gaussian' or 'constant'"),
        ({"sw_batch_size": 0}, "sw_batch_size must be >= 1"),
        ({"roi_size": (8, 8, 8)}, "has 3 axes but the input has 2"),
    ],
    ids=["overlap", "mode", "sw-batch", "roi-dims"],
)
def test_bad_options_are_rejected(kwargs: dict, match: str) -> None:
    kwargs = {"roi_size": (8, 8), **kwargs}
    roi = kwargs.pop("roi_size")
    with pytest.raises(ValueError, match=match):
        sliding_window_inference(torch.zeros(1, 1, 12, 12), roi, lambda x: x, **kwargs)


# --- slice-wise ---------------------------------------------------------------------------


def test_slicewise_feeds_stacked_slices_and_puts_them_back_along_z() -> None:
    # Prepare
    volume = torch.randn(2, 1, 12, 10, 5)  # (B, C, X, Y, Z): 10 axial slices in total
    model = _conv(2, in_channels=1, out_channels=2)
    seen: list[tuple[int, ...]] = []

    def predictor(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return model(x)

    # Execute
    out = slicewise_inference(volume, predictor, batch_size=4)
    # Assert
    assert seen == [(4, 1, 12, 10), (4, 1, 12, 10), (2, 1, 12, 10)]
    assert out.shape == (2, 2, 12, 10, 5)
    with torch.no_grad():
        for b in range(2):
            for z in range(5):
                torch.testing.assert_close(out[b, :, :, :, z], model(volume[b : b + 1, ..., z])[0])


def test_slicewise_along_depth_first_axis() -> None:
    volume = torch.randn(1, 1, 4, 9, 11)  # (B, C, D, H, W)
    model = _conv(2, in_channels=1, out_channels=3)
    out = slicewise_inference(volume, model, axis=2, batch_size=3)
    assert out.shape == (1, 3, 4, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(out[0, :, 2], model(volume[:, :, 2])[0])


def test_slicewise_with_a_2d_sliding_window_matches_per_slice_window() -> None:
    volume = torch.randn(1, 1, 30, 26, 3)
    model = _conv(2, in_channels=1, out_channels=2)
    out = slicewise_inference(volume, model, roi_size=(16, 16), overlap=0.5, batch_size=2)
    assert out.shape == (1, 2, 30, 26, 3)
    for z in range(3):
        expected = sliding_window_inference(volume[..., z], (16, 16), model, overlap=0.5)
        torch.testing.assert_close(out[..., z], expected)


def test_slicewise_rejects_non_spatial_axis() -> None:
    with pytest.raises(ValueError, match="axis must be a spatial axis"):
        slicewise_inference(torch.zeros(1, 1, 4, 4, 4), lambda x: x, axis=1)


def test_public_api_is_pinned() -> None:
    import fedmed.inference as module

    assert sorted(module.__all__) == [
        "gaussian_importance_map",
        "slicewise_inference",
        "sliding_window_inference",
    ]
    assert all(hasattr(module, name) for name in module.__all__)
