"""Device lists and model placement: ``"cuda:0,cuda:1"`` splits LAMP over two GPUs.

A site names its devices as one text setting (``device`` in the site config, ``--device`` on
the command line): ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, or
a comma-separated list of these, one per pipeline stage, e.g. ``"cuda:0,cuda:1"``,
``"cpu,cpu"`` (tests) or ``"cpu,cuda:0"``. :func:`parse_devices` checks every entry against
this machine; :func:`place_model` puts a network on them:

- a :class:`~fedmed.nets.LAMPUNet` is split over the list by the profiling partitioner
  (:meth:`~fedmed.nets.LAMPUNet.partition`, balanced by time or memory), with its
  micro-batches and activation checkpointing set; one device means one stage;
- any other network goes to the single device given; a list of two or more devices for a
  network that cannot be split (COPLE-Net, the plain U-Net) is a ``ConfigError``.

Placement never changes the module tree, so the state_dict keys are those of the
single-device model and federated aggregation is unaffected. Profiling runs a few forward and
backward passes; the chosen stage sizes are remembered per (architecture, devices, balance,
sample shape) for the process, so a site that rebuilds its model every round profiles once.

Example:
    >>> net = place_model(LAMPUNet(features=(4, 8, 16)), "cpu,cpu", key="device",
    ...                   sample_shape=(1, 1, 16, 16, 16))
    >>> input_device(net), output_device(net)
    (device(type='cpu'), device(type='cpu'))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from fedmed.errors import ConfigError
from fedmed.nets.lamp import LAMPUNet
from fedmed.nets.partition import Balance, Partition

__all__ = ["BALANCES", "input_device", "output_device", "parse_devices", "place_model"]

logger = logging.getLogger(__name__)

BALANCES: tuple[str, ...] = ("time", "memory")
# (architecture, devices, balance, sample shape) -> the partition the profiler chose
_PARTITIONS: dict[tuple[object, ...], Partition] = {}


def _one_device(entry: str, *, key: str, text: str) -> torch.device:
    name = entry.strip().lower()
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"{key} = {text!r}: {entry.strip()!r} is not a device; use auto, cpu, cuda or "
            "cuda:N, or a comma-separated list of them such as 'cuda:0,cuda:1'"
        ) from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ConfigError(
            f"{key} = {text!r}: device type {device.type!r} is not supported; use cpu or cuda:N"
        )
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= count:
        have = f"CUDA devices 0..{count - 1}" if count else "no CUDA device"
        raise ConfigError(
            f"{key} = {text!r}: {entry.strip()!r} does not exist, this machine has {have}; "
            "name an existing device or use cpu"
        )
    return torch.device("cuda", index)


def parse_devices(
    text: str | torch.device | Sequence[str | torch.device], *, key: str
) -> tuple[torch.device, ...]:
    """The devices named by ``text`` (``"cuda:0,cuda:1"``, ``"cpu"``, ``"auto"`` ...).

    ``key`` names the setting in error messages. A ``torch.device`` or a list of names is
    accepted too. ``cuda`` means ``cuda:0``. Raises ``ConfigError`` for an empty list, an
    unknown device type, a CUDA index this machine lacks, or ``auto`` inside a list.

    Example:
        >>> parse_devices("cpu,cpu", key="device")
        (device(type='cpu'), device(type='cpu'))
    """
    if isinstance(text, torch.device):
        entries, shown = [str(text)], str(text)
    elif isinstance(text, str):
        entries, shown = text.split(","), text
    else:
        entries = [str(t) for t in text]
        shown = ",".join(entries)
    entries = [e for e in entries if e.strip()]
    if not entries:
        raise ConfigError(f"{key} = {shown!r} names no device: use auto, cpu, cuda:0 or a list")
    if len(entries) > 1 and any(e.strip().lower() == "auto" for e in entries):
        raise ConfigError(
            f"{key} = {shown!r}: 'auto' stands alone; list the devices, e.g. 'cuda:0,cuda:1'"
        )
    return tuple(_one_device(e, key=key, text=shown) for e in entries)


def _architecture(model: LAMPUNet) -> tuple[object, ...]:
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return (type(model).__name__, model.skip_connections, shapes)


def place_model(
    model: nn.Module,
    devices: str | Sequence[torch.device],
    *,
    key: str = "device",
    balance: Balance | Sequence[int] = "memory",
    micro_batches: int | None = None,
    checkpointing: bool | None = None,
    sample_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Put ``model`` on ``devices`` (see the module docstring) and return it (the same object).

    Args:
        model: the network; a ``LAMPUNet`` is partitioned, anything else is moved whole.
        devices: a device list (``"cuda:0,cuda:1"``, read by :func:`parse_devices`) or
            :func:`parse_devices`'s result, one per pipeline stage.
        key: the setting named in errors.
        balance: LAMP's partition objective, ``"time"`` or ``"memory"``, or stage sizes.
        micro_batches: LAMP's micro-batches per batch (``None`` keeps the model's).
        checkpointing: LAMP's activation checkpointing (``None`` keeps the model's).
        sample_shape: input ``(1, C, D, H, W)`` profiled for balancing, e.g. the patch.

    Raises ``ConfigError`` naming ``key`` for several devices and a model that cannot be split,
    more stages than the model has cells, or a bad balance or micro-batch count.
    """
    if isinstance(devices, str):
        devices = parse_devices(devices, key=key)
    devices = tuple(torch.device(d) for d in devices)
    if not devices:
        raise ConfigError(f"{key} names no device: use auto, cpu, cuda:0 or a list")
    if not isinstance(model, LAMPUNet):
        if len(devices) > 1:
            raise ConfigError(
                f"{key} lists {len(devices)} devices but {type(model).__name__} cannot be split "
                "across devices (only lamp_unet can): name one device, or use model lamp_unet"
            )
        return model.to(devices[0])
    if micro_batches is not None:
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int):
            raise ConfigError(f"lamp-micro-batches = {micro_batches!r} must be an integer >= 1")
        if micro_batches < 1:
            raise ConfigError(f"lamp-micro-batches = {micro_batches} must be >= 1, e.g. 4")
        model.chunks = micro_batches
    if checkpointing is not None:
        model.checkpoint = bool(checkpointing)
    if isinstance(balance, str) and balance not in BALANCES:
        raise ConfigError(f"lamp-balance = {balance!r} is unknown: use time or memory")
    if len(devices) > len(model.cells):
        raise ConfigError(
            f"{key} lists {len(devices)} devices but the model has only {len(model.cells)} "
            "cells to split: name fewer devices"
        )
    shape = tuple(int(s) for s in sample_shape) if sample_shape else None
    memo = (_architecture(model), devices, balance, shape)
    known = _PARTITIONS.get(memo) if isinstance(balance, str) and len(devices) > 1 else None
    try:
        model.partition(devices, balance=known.sizes if known else balance, sample_shape=shape)
    except ValueError as err:
        raise ConfigError(f"{key}: cannot partition the model: {err}") from err
    if known is not None:
        model.placement = known
    elif isinstance(balance, str) and len(devices) > 1:
        _PARTITIONS[memo] = model.placement
    return model


def input_device(model: nn.Module) -> torch.device:
    """Where ``model`` takes its input: the first pipeline stage's device, else its parameters'."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def output_device(model: nn.Module) -> torch.device:
    """Where ``model`` returns its output: a LAMP model's last stage, else its parameters'."""
    if isinstance(model, LAMPUNet):
        return model.output_device
    return input_device(model)
