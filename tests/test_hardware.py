"""HardwareSettings: the site-config keys, their validation, autocast and memory format."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmed.errors import ConfigError
from fedmed.hardware import HARDWARE_KEYS, HardwareSettings
from fedmed.nets import LAMPUNet

CPU = torch.device("cpu")


def test_every_key_is_read_from_a_site_config() -> None:
    # Prepare
    values = {
        "device": "cpu,cpu",
        "lamp-micro-batches": 8,
        "lamp-checkpointing": False,
        "lamp-balance": "time",
        "amp": "bf16",
        "channels-last": "true",
        "compile": False,
        "data-dir": "ignored: not a hardware key",
    }

    # Execute
    hw = HardwareSettings.from_node_config(values, source="site config a.toml")

    # Assert
    assert hw == HardwareSettings(
        devices=(CPU, CPU),
        lamp_micro_batches=8,
        lamp_checkpointing=False,
        lamp_balance="time",
        amp="bf16",
        channels_last=True,
        compile=False,
    )
    assert sorted(hw.describe()) == sorted(HARDWARE_KEYS)
    assert HardwareSettings.from_node_config(hw.describe(), source="x") == hw


def test_a_toml_list_of_devices_is_a_device_list() -> None:
    hw = HardwareSettings.from_node_config({"device": ["cpu", "cpu"]})
    assert hw.devices == (CPU, CPU)


def test_a_lamp_model_split_beforehand_gives_its_settings() -> None:
    net = LAMPUNet(features=(4, 8, 16), devices=["cpu", "cpu"], balance=(2, 4), chunks=3)
    hw = HardwareSettings.of_split_model(net)
    assert hw is not None
    assert (hw.devices, hw.lamp_micro_batches, hw.lamp_checkpointing) == ((CPU, CPU), 3, True)
    assert HardwareSettings.of_split_model(LAMPUNet(features=(4, 8, 16))) is None
    assert HardwareSettings.of_split_model(nn.Conv2d(1, 1, 1)) is None


def test_defaults() -> None:
    hw = HardwareSettings.from_node_config({}, source="x")
    assert (hw.lamp_micro_batches, hw.lamp_checkpointing, hw.lamp_balance) == (4, True, "memory")
    assert (hw.amp, hw.channels_last, hw.compile) == ("auto", False, False)
    assert hw.amp_dtype == (torch.float16 if torch.cuda.is_available() else None)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"device": "cpu,cuda:99"}, "device = 'cpu,cuda:99': 'cuda:99' does not exist"),
        ({"amp": "fp17"}, "amp = 'fp17' is unknown: use auto, off, fp16, bf16"),
        ({"device": "cpu", "amp": "fp16"}, "amp = 'fp16' needs CUDA devices but device = 'cpu'"),
        ({"lamp-balance": "speed"}, "lamp-balance = 'speed' is unknown: use time or memory"),
        ({"lamp-micro-batches": 0}, "lamp-micro-batches = 0 must be an integer >= 1"),
        ({"lamp-micro-batches": "four"}, "lamp-micro-batches = 'four' must be an integer"),
        ({"lamp-micro-batches": True}, "lamp-micro-batches = True must be an integer"),
        ({"channels-last": "maybe"}, "channels-last = 'maybe' must be true or false"),
        ({"compile": 2}, "compile = 2 must be true or false"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else "",
)
def test_invalid_values_name_the_source_and_key(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=f"^site config a.toml: {match}"):
        HardwareSettings.from_node_config(values, source="site config a.toml")


def test_bf16_autocast_runs_on_cpu_and_off_runs_float32() -> None:
    conv = nn.Conv2d(1, 2, 3)
    x = torch.randn(1, 1, 8, 8)
    with HardwareSettings(devices="cpu", amp="bf16").autocast():
        assert conv(x).dtype == torch.bfloat16
    with HardwareSettings(devices="cpu", amp="off").autocast():
        assert conv(x).dtype == torch.float32


@pytest.mark.parametrize(
    ("rank", "layout"), [(4, torch.channels_last), (5, torch.channels_last_3d)]
)
def test_channels_last_formats_inputs_of_both_ranks(rank: int, layout: torch.memory_format) -> None:
    x = torch.randn(2, 3, *(4,) * (rank - 2))
    out = HardwareSettings(devices="cpu", channels_last=True).format_input(x)
    assert out.is_contiguous(memory_format=layout)
    assert HardwareSettings(devices="cpu").format_input(x) is x


def test_prepare_partitions_lamp_and_sets_the_3d_layout() -> None:
    hw = HardwareSettings(devices="cpu,cpu", channels_last=True, lamp_micro_batches=2)
    net = hw.prepare(LAMPUNet(features=(4, 8, 16)), sample_shape=(1, 1, 16, 16, 16))
    assert len(net.placement.sizes) == 2 and net.chunks == 2
    conv = net.cells[0].block[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d)


def test_public_api_is_pinned() -> None:
    import fedmed.hardware as module

    assert sorted(module.__all__) == ["AMP_MODES", "HARDWARE_KEYS", "HardwareSettings"]
    assert all(hasattr(module, name) for name in module.__all__)
