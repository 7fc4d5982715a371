"""Every network: output shape, finite values, a gradient on every parameter."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from fedmed.nets import COPLENet, LAMPUNet, UNet3D

SMALL_2D = (8, 16, 32, 64, 128)
SMALL_3D = (4, 8, 16)

CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, ...]]] = {
    "coplenet-2d": (
        lambda: COPLENet(in_channels=1, out_channels=2, features=SMALL_2D),
        (2, 1, 32, 32),
        (2, 2, 32, 32),
    ),
    "coplenet-5d": (
        lambda: COPLENet(in_channels=2, out_channels=3, features=SMALL_2D),
        (1, 2, 3, 32, 16),
        (1, 3, 3, 32, 16),
    ),
    "unet3d-instance": (
        lambda: UNet3D(in_channels=1, out_channels=2, features=SMALL_3D),
        (2, 1, 8, 8, 8),
        (2, 2, 8, 8, 8),
    ),
    "unet3d-batch": (
        lambda: UNet3D(in_channels=2, out_channels=4, features=SMALL_3D, norm=nn.BatchNorm3d),
        (2, 2, 8, 8, 8),
        (2, 4, 8, 8, 8),
    ),
    "lamp-skips-2dev": (
        lambda: LAMPUNet(
            features=SMALL_3D, devices=["cpu", "cpu"], chunks=2, sample_shape=(1, 1, 8, 8, 8)
        ),
        (2, 1, 8, 8, 8),
        (2, 2, 8, 8, 8),
    ),
    "lamp-noskips-1dev": (
        lambda: LAMPUNet(features=SMALL_3D, skip_connections=False, devices=["cpu"]),
        (2, 1, 8, 8, 8),
        (2, 2, 8, 8, 8),
    ),
}


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_network_gives_shape_finite_output_and_gradient_on_every_parameter(name: str) -> None:
    # Prepare
    torch.manual_seed(0)
    build, in_shape, out_shape = CASES[name]
    net = build()
    x = torch.randn(*in_shape)

    # Execute
    y = net(x)
    y.float().pow(2).mean().backward()

    # Assert
    assert y.shape == out_shape
    assert torch.isfinite(y).all()
    for pname, p in net.named_parameters():
        assert p.grad is not None, f"No gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"Non-finite gradient for {pname}"


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_network_runs_in_eval_mode_without_grad(name: str) -> None:
    build, in_shape, out_shape = CASES[name]
    net = build().eval()
    with torch.no_grad():
        y = net(torch.randn(*in_shape))
    assert y.shape == out_shape
    assert not y.requires_grad
