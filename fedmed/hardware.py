"""A site's hardware settings: devices, LAMP pipelining, mixed precision, memory format, compile.

These fit the computation to the site's machine and do not change what the model learns
(beyond floating-point rounding), so they live in the site config (Flower's node config), not
in the run settings the server sends. One frozen :class:`HardwareSettings` holds them;
:meth:`HardwareSettings.from_node_config` reads and validates the site-config keys:

=====================  =========  ==============================================================
key                    default    meaning
=====================  =========  ==============================================================
``device``             ``auto``   ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a list, one per LAMP
                                  stage: ``"cuda:0,cuda:1"``, ``"cpu,cpu"``, ``"cpu,cuda:0"``
``lamp-micro-batches`` ``4``      GPipe micro-batches per batch (the LAMP reference's 4)
``lamp-checkpointing`` ``true``   recompute each stage's activations in backward (less memory)
``lamp-balance``       ``memory`` partition objective: ``memory`` (the reference's) or ``time``
``amp``                ``auto``   mixed precision: ``off``, ``fp16`` (CUDA only, with a gradient
                                  scaler), ``bf16`` (CPU, and GPUs that support it) or ``auto``
                                  (fp16 when every device is CUDA, else off)
``channels-last``      ``false``  channels-last memory format for weights and inputs
``compile``            ``false``  ``torch.compile`` the training forward (first steps are slow)
=====================  =========  ==============================================================

The defaults are what ``bench/models.py`` measured as a gain or neutral; see the README's
benchmark table for the figures.

Example:
    >>> hw = HardwareSettings.from_node_config({"device": "cpu,cpu", "amp": "bf16"})
    >>> hw.amp_dtype
    torch.bfloat16
    >>> with hw.autocast():
    ...     logits = model(hw.format_input(images))
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedmed.devices import BALANCES, parse_devices, place_model
from fedmed.errors import ConfigError
from fedmed.nets.lamp import LAMPUNet

__all__ = ["AMP_MODES", "HARDWARE_KEYS", "HardwareSettings"]

AMP_MODES: tuple[str, ...] = ("auto", "off", "fp16", "bf16")
HARDWARE_KEYS: tuple[str, ...] = (
    "device",
    "lamp-micro-batches",
    "lamp-checkpointing",
    "lamp-balance",
    "amp",
    "channels-last",
    "compile",
)
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _auto_devices() -> tuple[torch.device, ...]:
    return parse_devices("auto", key="device")


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cpu":
        return True  # autocast runs bf16 on any CPU (fast where AVX512-BF16/AMX exist)
    return torch.cuda.get_device_capability(device) >= (8, 0)


@dataclass(frozen=True)
class HardwareSettings:
    """How a site runs the model on its hardware; invalid values raise ``ConfigError``.

    ``devices`` accepts the text form too (``HardwareSettings(devices="cpu,cpu")``).
    The fields mirror the site-config keys of the module docstring (``lamp_balance`` for
    ``lamp-balance`` ...).

    Example:
        >>> HardwareSettings(devices="cuda:0,cuda:1", lamp_micro_batches=8).amp_dtype
        torch.float16
    """

    devices: tuple[torch.device, ...] = field(default_factory=_auto_devices)
    lamp_micro_batches: int = 4
    lamp_checkpointing: bool = True
    lamp_balance: str = "memory"
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        # Text or torch.device entries alike: every device is checked against this machine.
        object.__setattr__(self, "devices", parse_devices(self.devices, key="device"))
        micro = self.lamp_micro_batches
        if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
            raise ConfigError(f"lamp-micro-batches = {micro!r} must be an integer >= 1, e.g. 4")
        if self.lamp_balance not in BALANCES:
            raise ConfigError(
                f"lamp-balance = {self.lamp_balance!r} is unknown: use {' or '.join(BALANCES)}"
            )
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp = {self.amp!r} is unknown: use {', '.join(AMP_MODES)}")
        shown = ",".join(str(d) for d in self.devices)
        if self.amp == "fp16" and any(d.type != "cuda" for d in self.devices):
            raise ConfigError(
                f"amp = 'fp16' needs CUDA devices but device = {shown!r}: use amp = 'bf16' "
                "(supported on CPU) or 'off'"
            )
        if self.amp == "bf16":
            for d in self.devices:
                if not _bf16_supported(d):
                    raise ConfigError(
                        f"amp = 'bf16': {d} does not support bfloat16 (compute capability "
                        "< 8.0): use amp = 'fp16' or 'off'"
                    )

    @classmethod
    def from_node_config(
        cls, values: Mapping[str, Any], *, source: str = "site config"
    ) -> HardwareSettings:
        """Read the hardware keys of a site config (other keys are left to their readers).

        ``values`` is Flower's ``context.node_config`` or a TOML table. ``source`` (e.g.
        ``"site config site-A.toml"``) prefixes every error message, which then names the key,
        the bad value and the fix. Booleans may be TOML booleans or the words true/false;
        counts integers or digit strings.
        """
        options: dict[str, Any] = {}
        try:
            if "device" in values:  # text, or a TOML list of names
                device = values["device"]
                text = device if isinstance(device, (list, tuple)) else str(device)
                options["devices"] = parse_devices(text, key="device")
            if "lamp-micro-batches" in values:
                options["lamp_micro_batches"] = _integer(values, "lamp-micro-batches")
            for key in ("lamp-checkpointing", "channels-last", "compile"):
                if key in values:
                    options[key.replace("-", "_")] = _boolean(values, key)
            for key in ("lamp-balance", "amp"):
                if key in values:
                    options[key.replace("-", "_")] = str(values[key]).strip().lower()
            return cls(**options)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype (``None``: full precision); ``auto`` resolved for the devices."""
        if self.amp == "fp16":
            return torch.float16
        if self.amp == "bf16":
            return torch.bfloat16
        if self.amp == "auto" and all(d.type == "cuda" for d in self.devices):
            return torch.float16
        return None

    @property
    def uses_grad_scaler(self) -> bool:
        """fp16 needs loss scaling against gradient underflow; bf16 has float32's range."""
        return self.amp_dtype == torch.float16

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast on every device type of the list (none with amp off)."""
        dtype = self.amp_dtype
        with contextlib.ExitStack() as stack:
            if dtype is not None:
                for device_type in sorted({d.type for d in self.devices}):
                    stack.enter_context(torch.autocast(device_type=device_type, dtype=dtype))
            yield

    def format_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in channels-last layout when ``channels_last`` (4D or 5D), else as is."""
        if not self.channels_last or x.ndim not in (4, 5):
            return x
        layout = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=layout)

    def prepare(self, model: nn.Module, *, sample_shape: Sequence[int] | None = None) -> nn.Module:
        """Place ``model`` on the devices (LAMP: partitioned) and set its memory format.

        ``sample_shape`` is the input ``(1, C, *patch)`` LAMP's partitioner profiles. Returns
        ``model`` itself (``compile`` is applied by the caller to the forward only, so the
        state_dict keys never gain torch.compile's ``_orig_mod.`` prefix).
        """
        model = place_model(
            model,
            self.devices,
            key="device",
            balance=self.lamp_balance,
            micro_batches=self.lamp_micro_batches,
            checkpointing=self.lamp_checkpointing,
            sample_shape=sample_shape,
        )
        if self.channels_last:
            ranks = {p.ndim for p in model.parameters()}
            layout = torch.channels_last_3d if 5 in ranks else torch.channels_last
            model.to(memory_format=layout)
        return model

    @classmethod
    def of_split_model(cls, model: nn.Module) -> HardwareSettings | None:
        """The settings a LAMP model already split over several devices runs with (its
        devices, micro-batches and checkpointing), or None for any other model."""
        if not isinstance(model, LAMPUNet) or len(model.placement.sizes) < 2:
            return None
        return cls(
            devices=model.placement.devices,
            lamp_micro_batches=model.chunks,
            lamp_checkpointing=model.checkpoint,
            lamp_balance=balance if (balance := model.placement.balance) in BALANCES else "memory",
        )

    def compiled(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``model``'s forward through ``torch.compile`` when ``compile`` is on, else ``model``.

        Only the forward is wrapped: ``model`` keeps its own state_dict keys (no
        ``_orig_mod.`` prefix), so what a site sends is unchanged.
        """
        if not self.compile:
            return model
        with warnings.catch_warnings():
            # importing torch._dynamo trips torch's own deprecated torch.jit helpers
            warnings.simplefilter("ignore", DeprecationWarning)
            # static shapes: a recompile for a new batch size would otherwise turn dynamic,
            # which inductor fails to compile for COPLE-Net's backward (torch 2.13, CPU)
            return torch.compile(model, dynamic=False)

    def describe(self) -> dict[str, Any]:
        """The settings as site-config keys and JSON values (for logs and metrics)."""
        return {
            "device": ",".join(str(d) for d in self.devices),
            "lamp-micro-batches": self.lamp_micro_batches,
            "lamp-checkpointing": self.lamp_checkpointing,
            "lamp-balance": self.lamp_balance,
            "amp": self.amp,
            "channels-last": self.channels_last,
            "compile": self.compile,
        }


def _integer(values: Mapping[str, Any], key: str) -> int:
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{key} = {value!r} must be an integer >= 1")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{key} = {value!r} must be an integer >= 1") from None


def _boolean(values: Mapping[str, Any], key: str) -> bool:
    value = values[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{key} = {value!r} must be true or false")
