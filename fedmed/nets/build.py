"""``build_model``: a network from its name and options, as read from a config file.

Example:
    >>> net = build_model("unet3d", in_channels=1, out_channels=2, features=(16, 32, 64))
    >>> type(net).__name__
    'UNet3D'
"""

from __future__ import annotations

import inspect

from torch import nn

from fedmed.errors import ConfigError
from fedmed.nets.coplenet import COPLENet
from fedmed.nets.lamp import LAMPUNet
from fedmed.nets.unet3d import UNet3D

__all__ = ["MODELS", "build_model"]

MODELS: dict[str, type[nn.Module]] = {
    "coplenet": COPLENet,
    "unet3d": UNet3D,
    "lamp_unet": LAMPUNet,
}


def build_model(name: str, **options: object) -> nn.Module:
    """Build the network called ``name`` (``coplenet``, ``unet3d``, ``lamp_unet``) with ``options``.

    Raises ``ConfigError`` for an unknown name, an unknown option or an invalid value.
    """
    try:
        cls = MODELS[name]
    except KeyError:
        raise ConfigError(
            f"model name {name!r} is unknown: use one of {', '.join(sorted(MODELS))}"
        ) from None
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option {', '.join(unknown)}: "
            f"valid options are {', '.join(sorted(accepted))}"
        )
    try:
        return cls(**options)
    except ValueError as err:
        raise ConfigError(f"model {name!r}: {err}") from err
