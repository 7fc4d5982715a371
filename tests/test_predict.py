"""predict_volume on a LAMP model split over devices, whole-volume inference, hardware settings."""

from __future__ import annotations

import pytest
import torch

from fedmed.hardware import HardwareSettings
from fedmed.inference import sliding_window_inference
from fedmed.nets import LAMPUNet
from fedmed.predict import predict_volume
from fedmed.roundconfig import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAMP = TrainConfig(model="lamp_unet", model_features=(4, 8, 16), patch_size=(16, 16, 16))


def _pair() -> tuple[LAMPUNet, LAMPUNet]:
    torch.manual_seed(0)
    reference = LAMPUNet(features=(4, 8, 16), chunks=1, checkpoint=False)
    split = LAMPUNet(features=(4, 8, 16), devices=["cpu", "cpu"], chunks=2, balance=(3, 3))
    split.load_state_dict(reference.state_dict())
    return reference, split


def _volume(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("whole_volume", [False, True], ids=["window", "whole"])
def test_a_split_lamp_model_predicts_the_same_label_map(whole_volume: bool) -> None:
    reference, split = _pair()
    image = _volume((24, 20, 18))

    expected = predict_volume(reference, image, LAMP, whole_volume=whole_volume)
    got = predict_volume(split, image, LAMP, whole_volume=whole_volume)

    assert got.shape == (24, 20, 18)
    assert torch.equal(got, expected)


def test_whole_volume_equals_one_window_covering_the_volume() -> None:
    reference, _ = _pair()
    image = _volume((16, 16, 16))
    with torch.no_grad():
        window = sliding_window_inference(image[None], (16, 16, 16), reference.eval())
    assert torch.equal(
        predict_volume(reference, image, LAMP, whole_volume=True), window[0].argmax(0)
    )


def test_whole_volume_pads_sizes_the_poolings_do_not_divide() -> None:
    reference, _ = _pair()
    assert predict_volume(reference, _volume((13, 9, 6)), LAMP, whole_volume=True).shape == (
        13,
        9,
        6,
    )


def test_hardware_settings_apply_to_prediction() -> None:
    reference, _ = _pair()
    image = _volume((16, 16, 16))
    plain = predict_volume(reference, image, LAMP)
    hardware = HardwareSettings(devices="cpu", amp="bf16", channels_last=True)
    low = predict_volume(reference, image, LAMP, hardware=hardware)
    assert low.shape == plain.shape
    # bf16 keeps 8 mantissa bits: nearly every voxel keeps its class
    assert (low == plain).float().mean() > 0.9
