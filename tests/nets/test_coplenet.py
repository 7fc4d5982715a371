"""COPLE-Net: the reference's size, 5D folding, configuration errors."""

from __future__ import annotations

import pytest
import torch

from fedmed.nets import COPLENet

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_default_coplenet_has_the_reference_parameter_count() -> None:
    assert _count(COPLENet(in_channels=1, out_channels=2)) == 10_521_666


def test_small_features_shrink_the_network() -> None:
    assert _count(COPLENet(features=(8, 16, 32, 64, 128))) < 10_521_666 // 10


def test_5d_input_equals_slice_by_slice_2d_input() -> None:
    # Prepare
    torch.manual_seed(0)
    net = COPLENet(features=(8, 16, 32, 64, 128)).eval()
    volume = torch.randn(2, 1, 3, 32, 32)

    # Execute
    with torch.no_grad():
        out = net(volume)
        per_slice = torch.stack([net(volume[:, :, d]) for d in range(3)], dim=2)

    # Assert
    assert out.shape == (2, 2, 3, 32, 32)
    torch.testing.assert_close(out, per_slice, atol=1e-5, rtol=1e-5)


def test_decoder_reuses_encoder_dropout_in_reverse() -> None:
    net = COPLENet(dropout=(0.0, 0.1, 0.2, 0.3, 0.4))
    assert [up.conv[1].p for up in net.ups] == [0.3, 0.2, 0.1, 0.0]
    assert [down.conv[1].p for down in net.downs] == [0.1, 0.2, 0.3, 0.4]


def test_act_class_is_used_everywhere() -> None:
    net = COPLENet(features=(8, 16, 32, 64, 128), act=torch.nn.ELU)
    assert any(isinstance(m, torch.nn.ELU) for m in net.modules())
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in net.modules())


def test_group_norm_variant_keeps_parameter_count_and_weight_keys() -> None:
    # Prepare
    batch = COPLENet(features=(8, 16, 32, 64, 128))
    group = COPLENet(features=(8, 16, 32, 64, 128), norm="group")

    # Execute
    batch_keys = {k for k in batch.state_dict() if not k.endswith(_BN_BUFFERS)}
    group_keys = set(group.state_dict())

    # Assert
    assert group_keys == batch_keys
    assert _count(group) == _count(batch)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in group.modules())
    norms = [m for m in group.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in batch.modules())
    assert {m.num_groups for m in norms} == {4, 8}  # 4-channel bridges get 4 groups


def test_default_norm_is_batch_norm_and_state_dict_is_unchanged() -> None:
    net = COPLENet(in_channels=1, out_channels=2)

    assert isinstance(net.in_conv[0][1], torch.nn.BatchNorm2d)
    assert "in_conv.0.1.running_mean" in net.state_dict()
    assert COPLENet(norm=torch.nn.BatchNorm2d).state_dict().keys() == net.state_dict().keys()


def test_group_norm_output_of_a_sample_does_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    net = COPLENet(features=(8, 16, 32, 64, 128), dropout=(0.0,) * 5, norm=torch.nn.GroupNorm)
    net.train()  # where batch norm would mix the samples
    x = torch.randn(3, 1, 32, 32)

    with torch.no_grad():
        torch.testing.assert_close(net(x)[:1], net(x[:1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"features": (32, 64, 128, 256)}, "features must be 5 positive ints"),
        ({"features": (32, 64, 128, 256, 500)}, "features must double"),
        ({"features": (6, 12, 24, 48, 96)}, "multiple of 4"),
        ({"dropout": (0.0, 0.0, 0.3, 0.4)}, "dropout must be 5 probabilities"),
        ({"dropout": (0.0, 0.0, 0.3, 0.4, 1.0)}, "dropout must be 5 probabilities"),
        ({"in_channels": 0}, "in_channels and out_channels must be positive"),
        ({"norm": "layer"}, "norm must be 'batch', 'group' or a normalization class"),
    ],
    ids=[
        "four-levels",
        "not-doubling",
        "odd-base",
        "four-dropouts",
        "dropout-one",
        "no-input",
        "unknown-norm",
    ],
)
def test_invalid_configuration_raises_value_error(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        COPLENet(**options)


@pytest.mark.parametrize(
    ("shape", "match"),
    [((1, 1, 30, 32), "divisible by 16"), ((1, 32, 32), r"expects \(B, C, H, W\)")],
    ids=["size", "rank"],
)
def test_bad_input_shape_raises_value_error(shape: tuple[int, ...], match: str) -> None:
    net = COPLENet(features=(8, 16, 32, 64, 128))
    with pytest.raises(ValueError, match=match):
        net(torch.zeros(shape))
