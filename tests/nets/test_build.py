"""build_model and the package's public names."""

from __future__ import annotations

import pytest

import fedmed.nets
from fedmed.errors import ConfigError
from fedmed.nets import COPLENet, LAMPUNet, UNet3D, build_model


@pytest.mark.parametrize(
    ("name", "options", "cls"),
    [
        ("coplenet", {"features": (8, 16, 32, 64, 128)}, COPLENet),
        ("unet3d", {"features": (4, 8)}, UNet3D),
        ("lamp_unet", {"features": (4, 8), "chunks": 2}, LAMPUNet),
    ],
    ids=["coplenet", "unet3d", "lamp_unet"],
)
def test_build_model_returns_the_named_network(name: str, options: dict, cls: type) -> None:
    assert type(build_model(name, **options)) is cls


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(
        ConfigError, match="'unet' is unknown: use one of coplenet, lamp_unet, unet3d"
    ):
        build_model("unet")


def test_unknown_option_is_named() -> None:
    with pytest.raises(ConfigError, match="has no option feature: valid options are"):
        build_model("unet3d", feature=(4, 8))


def test_invalid_value_becomes_config_error() -> None:
    with pytest.raises(ConfigError, match="model 'coplenet': features must double") as info:
        build_model("coplenet", features=(8, 16, 32, 64, 100))
    assert isinstance(info.value.__cause__, ValueError)


def test_all_public_names_are_exported() -> None:
    for name in fedmed.nets.__all__:
        assert hasattr(fedmed.nets, name), name
    assert {"COPLENet", "UNet3D", "LAMPUNet", "build_model"} <= set(fedmed.nets.__all__)
