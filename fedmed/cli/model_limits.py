"""Bounds on what a checkpoint may ask ``fedmed infer`` to build, checked before allocating.

A checkpoint is untrusted input like any file: its metadata (or, for a server round checkpoint,
its weights' shapes) picks the network's features, the window size and the spacing images are
resampled to. Crafted values (features 65536, pixdim 0.001 mm) would ask for terabytes; these
checks refuse them with a ModelError naming the checkpoint, the value and the limit:

==========================================  =============================================
what                                        bound
==========================================  =============================================
channels of one level (``model-features``)  1 to :data:`MAX_FEATURES` (1024)
levels                                      1 to :data:`MAX_LEVELS` (8)
input / output channels                     1 to :data:`MAX_CHANNELS` (64)
window side (``patch-size``)                1 to :data:`MAX_PATCH_SIDE` (1024) voxels
resampling spacing (``pixdim``)             :data:`MIN_PIXDIM_MM` (0.1) to
                                            :data:`MAX_PIXDIM_MM` (50) mm, finite
weights + one batch of windows              ``max_bytes`` (``fedmed infer --max-memory``,
                                            default :data:`DEFAULT_MAX_BYTES` = 16 GiB)
one image after resampling                  ``max_bytes`` as well
==========================================  =============================================

The memory figures are estimates (float32; a few activations per level kept at once), meant to
stop absurd requests, not to budget a real one to the byte.

Example:
    >>> check_model_request(cfg, pixdim=(1.0, 1.0, 2.0), source="best.safetensors")
    >>> estimate_inference_bytes(cfg) < DEFAULT_MAX_BYTES
    True
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Protocol

from fedmed.errors import ModelError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_CHANNELS",
    "MAX_FEATURES",
    "MAX_LEVELS",
    "MAX_PATCH_SIDE",
    "MAX_PIXDIM_MM",
    "MIN_PIXDIM_MM",
    "check_image_request",
    "check_model_request",
    "estimate_inference_bytes",
]

MAX_FEATURES = 1024
MAX_LEVELS = 8
MAX_CHANNELS = 64
MAX_PATCH_SIDE = 1024
MIN_PIXDIM_MM = 0.1
MAX_PIXDIM_MM = 50.0
DEFAULT_MAX_BYTES = 16 << 30
_FLOAT = 4
_ACTIVATIONS_PER_LEVEL = 6  # conv outputs, skip, upsampled, concatenation ... kept at once
_WINDOWS_PER_CALL = {2: 8, 3: 4}  # slices per batch (predict.py), sliding-window batch


class _Request(Protocol):
    model: str
    model_features: tuple[int, ...] | None
    in_channels: int
    out_channels: int
    patch_size: tuple[int, ...]

    @property
    def spatial_dims(self) -> int: ...


def _features(cfg: _Request) -> tuple[int, ...]:
    if cfg.model_features:
        return tuple(cfg.model_features)
    from fedmed.nets.build import MODELS  # the network's own default

    cls = MODELS.get(cfg.model)
    default = inspect.signature(cls.__init__).parameters.get("features") if cls else None
    return tuple(default.default) if default is not None else ()


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.3g} GiB"


def _estimate(features: Sequence[int], dims: int, window: Sequence[int]) -> int:
    voxels = math.prod(window)
    weights = sum(4 * 3**dims * f * f for f in features)  # ~4 convolutions of f x f per level
    per_window = sum(f * voxels / (2**dims) ** i for i, f in enumerate(features))
    activations = per_window * _ACTIVATIONS_PER_LEVEL * _WINDOWS_PER_CALL.get(dims, 4)
    return int(_FLOAT * (weights + activations))


def estimate_inference_bytes(cfg: _Request) -> int:
    """Weights plus the activations of one call on a batch of windows (slices for 2D)."""
    return _estimate(_features(cfg), cfg.spatial_dims, cfg.patch_size)


def check_model_request(
    cfg: _Request,
    *,
    pixdim: Sequence[float] | None,
    source: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> None:
    """ModelError unless ``cfg`` and ``pixdim`` are within the bounds of the module doc."""
    where = f"checkpoint {source}"
    fix = "the metadata is corrupt or crafted: use a checkpoint written by fedmed"
    features = _features(cfg)
    if not 1 <= len(features) <= MAX_LEVELS:
        raise ModelError(
            f"{where}: model-features has {len(features)} levels, outside 1..{MAX_LEVELS}: {fix}"
        )
    if any(not 1 <= f <= MAX_FEATURES for f in features):
        raise ModelError(
            f"{where}: model-features {features} ask for up to {max(features)} channels, "
            f"outside 1..{MAX_FEATURES}: {fix}"
        )
    for name, value in (("in-channels", cfg.in_channels), ("out-channels", cfg.out_channels)):
        if not 1 <= value <= MAX_CHANNELS:
            raise ModelError(f"{where}: {name} {value} is outside 1..{MAX_CHANNELS}: {fix}")
    if any(not 1 <= side <= MAX_PATCH_SIDE for side in cfg.patch_size):
        raise ModelError(
            f"{where}: patch-size {tuple(cfg.patch_size)} is outside 1..{MAX_PATCH_SIDE} voxels "
            "per side: give --patch-size, or use a checkpoint written by fedmed"
        )
    if pixdim is not None:
        bad = [
            v
            for v in pixdim
            if not (math.isfinite(v) and MIN_PIXDIM_MM <= v <= MAX_PIXDIM_MM)  # NaN fails too
        ]
        if bad or len(pixdim) != 3:
            raise ModelError(
                f"{where}: pixdim {tuple(pixdim)} must be 3 spacings of {MIN_PIXDIM_MM} to "
                f"{MAX_PIXDIM_MM:g} mm: {fix}"
            )
    need = estimate_inference_bytes(cfg)
    if need > max_bytes:
        raise ModelError(
            f"{where}: model {cfg.model} with features {features} on windows of "
            f"{tuple(cfg.patch_size)} needs about {_gib(need)}, more than the memory cap "
            f"{_gib(max_bytes)}: raise --max-memory if this machine has it, or use a smaller "
            "--patch-size"
        )


def check_image_request(
    shape: Sequence[int],
    spacing: Sequence[float],
    cfg: _Request,
    *,
    pixdim: Sequence[float] | None,
    image: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> None:
    """ModelError when predicting an image of ``shape`` at ``spacing`` (mm), resampled to the
    model's ``pixdim``, would need more than ``max_bytes``: the image, class probabilities and
    label map in float32, plus for 2D models a batch of whole slices through the network."""
    target = [int(n) for n in shape[:3]]
    if pixdim is not None:
        target = [
            max(1, math.ceil(n * abs(s) / p))
            for n, s, p in zip(shape[:3], spacing, pixdim, strict=False)
        ]
    need = math.prod(target) * _FLOAT * (2 + cfg.out_channels)
    if cfg.spatial_dims == 2:
        need += _estimate(_features(cfg), 2, target[:2])
    if need > max_bytes:
        spacing_mm = tuple(round(float(s), 3) for s in spacing)
        raise ModelError(
            f"image {image}: {tuple(shape)} voxels of {spacing_mm} mm resampled to the model's "
            f"pixdim {tuple(pixdim) if pixdim else None} give {tuple(target)} voxels, about "
            f"{_gib(need)}, more than the memory cap {_gib(max_bytes)}: raise --max-memory if "
            "this machine has it, or use a model trained at a coarser pixdim"
        )
