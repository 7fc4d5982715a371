"""Device lists and placement: parsing, LAMP partitioned over "cpu,cpu", refusals naming the key."""

from __future__ import annotations

import pytest
import torch

from fedmed.devices import input_device, output_device, parse_devices, place_model
from fedmed.errors import ConfigError
from fedmed.nets import COPLENet, LAMPUNet, UNet3D

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FEATURES = (4, 8, 16)
SAMPLE = (1, 1, 16, 16, 16)
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cpu", (CPU,)),
        ("cpu,cpu", (CPU, CPU)),
        (" CPU , cpu ,", (CPU, CPU)),
        (["cpu", torch.device("cpu")], (CPU, CPU)),
        (torch.device("cpu"), (CPU,)),
    ],
    ids=["one", "list", "spaces", "sequence", "torch-device"],
)
def test_parse_devices_reads_names_and_lists(text, expected) -> None:
    assert parse_devices(text, key="device") == expected


def test_auto_is_cuda_when_available_else_cpu() -> None:
    expected = torch.device("cuda:0") if torch.cuda.is_available() else CPU
    assert parse_devices("auto", key="device") == (expected,)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "device = '' names no device"),
        ("auto,cpu", "'auto' stands alone"),
        ("gpu0", "'gpu0' is not a device; use auto, cpu, cuda or cuda:N"),
        ("cpu,meta", "device type 'meta' is not supported"),
        (f"cpu,cuda:{torch.cuda.device_count()}", "does not exist, this machine has"),
    ],
    ids=["empty", "auto-in-list", "unknown", "unsupported", "missing-gpu"],
)
def test_parse_devices_errors_name_the_key_and_value(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_devices(text, key="device")
    with pytest.raises(ConfigError, match=r"^--device = "):
        parse_devices(text, key="--device")


def _lamp(**options: object) -> LAMPUNet:
    torch.manual_seed(0)
    return LAMPUNet(features=FEATURES, **options)


def test_lamp_is_partitioned_over_cpu_cpu_and_matches_the_unpartitioned_model() -> None:
    # Prepare
    reference = _lamp(chunks=1, checkpoint=False)
    split = _lamp()
    split.load_state_dict(reference.state_dict())
    x = torch.randn(3, 1, 16, 16, 16)

    # Execute
    placed = place_model(
        split,
        parse_devices("cpu,cpu", key="device"),
        micro_batches=2,
        checkpointing=True,
        sample_shape=SAMPLE,
    )

    # Assert
    assert placed is split and len(split.placement.sizes) == 2
    assert (split.chunks, split.checkpoint) == (2, True)
    assert list(split.state_dict()) == list(UNet3D(features=FEATURES).state_dict())
    assert input_device(split) == output_device(split) == CPU
    torch.testing.assert_close(split(x), reference(x), atol=1e-5, rtol=1e-5)


def test_a_second_placement_of_the_same_architecture_reuses_the_partition() -> None:
    devices = (CPU, CPU)
    first = place_model(_lamp(), devices, balance="time", sample_shape=SAMPLE)
    second = place_model(_lamp(), devices, balance="time", sample_shape=SAMPLE)
    assert second.placement == first.placement
    assert second.placement.balance == "time"


def test_a_device_list_string_is_parsed_and_its_errors_name_the_key() -> None:
    net = place_model(_lamp(), "cpu,cpu", key="device", sample_shape=SAMPLE)
    assert net.placement.devices == (CPU, CPU)
    with pytest.raises(ConfigError, match=r"^--device = 'cpu,tpu'"):
        place_model(_lamp(), "cpu,tpu", key="--device")


def test_one_device_keeps_lamp_in_one_stage() -> None:
    net = place_model(_lamp(), (CPU,), sample_shape=SAMPLE)
    assert net.placement.sizes == (len(net.cells),)


@pytest.mark.parametrize(
    "model", [COPLENet(features=(4, 8, 16, 32, 64)), UNet3D(features=FEATURES)], ids=type
)
def test_a_list_for_a_model_that_cannot_be_split_names_the_key(model: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match=r"^device lists 2 devices but .* cannot be split"):
        place_model(model, (CPU, CPU), key="device")
    assert place_model(model, (CPU,)) is model


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"micro_batches": 0}, "lamp-micro-batches = 0 must be >= 1"),
        ({"balance": "speed"}, "lamp-balance = 'speed' is unknown"),
        ({"sample_shape": (1, 1, 10, 16, 16)}, "device: cannot partition the model: .* by 4"),
    ],
    ids=["micro-batches", "balance", "sample"],
)
def test_invalid_lamp_placement_raises_config_error(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        place_model(_lamp(), (CPU, CPU), **options)


def test_more_stages_than_cells_is_refused() -> None:
    with pytest.raises(ConfigError, match="lists 7 devices but the model has only 6 cells"):
        place_model(_lamp(), (CPU,) * 7)


def test_public_api_is_pinned() -> None:
    import fedmed.devices as module

    assert sorted(module.__all__) == [
        "BALANCES",
        "input_device",
        "output_device",
        "parse_devices",
        "place_model",
    ]
    assert all(hasattr(module, name) for name in module.__all__)
