"""UNet3D: sizes, cell structure, configuration errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmed.nets import UNet3D
from fedmed.nets.unet3d import DecoderCell, EncoderCell, HeadCell


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_default_unet3d_parameter_count_is_pinned() -> None:
    assert _count(UNet3D()) == 16_544_130


def test_skip_free_variant_has_fewer_parameters() -> None:
    with_skips = _count(UNet3D(features=(4, 8, 16)))
    without = _count(UNet3D(features=(4, 8, 16), skip_connections=False))
    # Each decoder block's first conv reads f instead of 2f channels: 27 * f * f fewer weights.
    assert with_skips - without == 27 * (4 * 4 + 8 * 8)


def test_cells_are_encoders_then_decoders_then_head() -> None:
    net = UNet3D(features=(4, 8, 16, 32))
    kinds = [type(cell) for cell in net.cells]
    assert kinds == [EncoderCell] * 4 + [DecoderCell] * 3 + [HeadCell]


def test_state_dict_keys_live_under_cells() -> None:
    keys = list(UNet3D(features=(4, 8)).state_dict())
    assert keys and all(k.startswith("cells.") for k in keys)


def test_batch_norm_option_uses_batch_norm() -> None:
    net = UNet3D(features=(4, 8), norm=nn.BatchNorm3d)
    assert any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in net.modules())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"features": (8,)}, "features must be at least 2"),
        ({"features": (8, -16)}, "features must be at least 2 positive ints"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ({"out_channels": 0}, "in_channels and out_channels must be positive"),
    ],
    ids=["one-level", "negative", "dropout", "no-output"],
)
def test_invalid_configuration_raises_value_error(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNet3D(**options)


def test_input_not_divisible_by_pooling_raises_value_error() -> None:
    net = UNet3D(features=(4, 8, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.zeros(1, 1, 8, 8, 6))
