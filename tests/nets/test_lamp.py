"""LAMPUNet: the pipelined model equals the unpartitioned one (CPU, two "devices")."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fedmed.nets import LAMPUNet, UNet3D

FEATURES = (4, 8, 16)
SAMPLE = (1, 1, 16, 16, 16)
# Same arithmetic in the same order per sample (instance norm is per sample), so the only
# differences come from splitting the batch into micro-batches for convolution kernels.
ATOL = 1e-5


def _pair(
    *, skips: bool, chunks: int, checkpoint: bool, devices: list[str]
) -> tuple[LAMPUNet, LAMPUNet]:
    torch.manual_seed(0)
    reference = LAMPUNet(features=FEATURES, skip_connections=skips, chunks=1, checkpoint=False)
    pipelined = LAMPUNet(
        features=FEATURES,
        skip_connections=skips,
        devices=devices,
        chunks=chunks,
        checkpoint=checkpoint,
        sample_shape=SAMPLE,
    )
    pipelined.load_state_dict(reference.state_dict())
    return reference, pipelined


@pytest.mark.parametrize("skips", [True, False], ids=["skips", "parallel"])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpoint"])
@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_pipelined_outputs_and_gradients_match_unpartitioned_model(
    skips: bool, checkpoint: bool, chunks: int
) -> None:
    # Prepare
    reference, pipelined = _pair(
        skips=skips, chunks=chunks, checkpoint=checkpoint, devices=["cpu", "cpu"]
    )
    x = torch.randn(4, 1, 16, 16, 16)
    target = torch.randn(4, 2, 16, 16, 16)

    # Execute
    y_ref = reference(x)
    y_pipe = pipelined(x)
    (y_ref - target).pow(2).mean().backward()
    (y_pipe - target).pow(2).mean().backward()

    # Assert
    assert pipelined.placement.sizes != (len(pipelined.cells),)
    torch.testing.assert_close(y_pipe, y_ref, atol=ATOL, rtol=1e-5)
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, p in pipelined.named_parameters():
        assert p.grad is not None, f"No gradient for {name}"
        torch.testing.assert_close(p.grad, ref_grads[name], atol=ATOL, rtol=1e-4, msg=name)


def test_three_stages_with_odd_batch_match_unpartitioned_model() -> None:
    reference, pipelined = _pair(skips=True, chunks=4, checkpoint=True, devices=["cpu"] * 3)
    x = torch.randn(3, 1, 16, 16, 16)
    assert len(pipelined.placement.sizes) == 3
    torch.testing.assert_close(pipelined(x), reference(x), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("skips", [True, False], ids=["skips", "parallel"])
def test_state_dict_keys_identical_to_single_device_model(skips: bool) -> None:
    single = UNet3D(features=FEATURES, skip_connections=skips)
    split = LAMPUNet(
        features=FEATURES, skip_connections=skips, devices=["cpu", "cpu"], sample_shape=SAMPLE
    )
    assert list(split.state_dict()) == list(single.state_dict())
    shapes = {k: v.shape for k, v in single.state_dict().items()}
    assert {k: v.shape for k, v in split.state_dict().items()} == shapes


@pytest.mark.parametrize(
    ("skips", "count"), [(True, 22_578_306), (False, 20_228_226)], ids=["skips", "parallel"]
)
def test_default_parameter_counts_are_pinned(skips: bool, count: int) -> None:
    net = LAMPUNet(skip_connections=skips)
    assert sum(p.numel() for p in net.parameters()) == count


def test_explicit_balance_places_cells_as_given() -> None:
    net = LAMPUNet(features=FEATURES, devices=["cpu", "cpu"], balance=(2, 4))
    assert net.placement.sizes == (2, 4)
    assert net.placement.bounds() == [(0, 2), (2, 6)]
    assert net.placement.balance == "explicit"


def test_without_devices_the_model_is_one_stage() -> None:
    net = LAMPUNet(features=FEATURES)
    assert net.placement.sizes == (len(net.cells),)
    assert net.output_device == torch.device("cpu")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"chunks": 0}, "chunks must be a positive int"),
        ({"devices": []}, "devices must name at least one device"),
        ({"devices": ["cpu"] * 7}, "7 devices for only 6 cells"),
        ({"devices": ["cpu", "cpu"], "balance": "speed"}, "balance must be 'time', 'memory'"),
        ({"devices": ["cpu", "cpu"], "balance": (3, 2)}, "summing to 6 cells"),
        ({"devices": ["cpu", "cpu"], "sample_shape": (1, 1, 10, 16, 16)}, "divisible by 4"),
    ],
    ids=["chunks", "no-devices", "too-many-devices", "balance", "sizes", "sample"],
)
def test_invalid_configuration_raises_value_error(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LAMPUNet(features=FEATURES, **options)


def test_batch_norm_with_micro_batches_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedmed.nets.lamp"):
        LAMPUNet(features=FEATURES, norm=nn.BatchNorm3d, chunks=2)
    assert "normalises each micro-batch separately" in caplog.text


def test_partitioning_keeps_weights_and_batch_norm_statistics() -> None:
    # Prepare
    net = LAMPUNet(features=FEATURES, norm=nn.BatchNorm3d, chunks=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    # Execute
    net.partition(["cpu", "cpu"], sample_shape=SAMPLE)

    # Assert
    after = net.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=0, rtol=0, msg=key)
    assert all(p.grad is None for p in net.parameters())


def test_skip_free_variant_has_the_same_keys_but_narrower_decoder_convs() -> None:
    # lamp-skips is a run setting: sites must agree, or the decoder shapes differ
    carried = LAMPUNet(features=FEATURES).state_dict()
    free = LAMPUNet(features=FEATURES, skip_connections=False).state_dict()
    assert list(carried) == list(free)
    differing = [k for k in carried if carried[k].shape != free[k].shape]
    assert differing == ["cells.3.block.0.weight", "cells.4.block.0.weight"]
