"""Whole-volume inference: a sliding window (3D U-Nets) and slice by slice (COPLE-Net).

``sliding_window_inference`` tiles the input with windows of ``roi_size`` that overlap by
``overlap``, runs ``predictor`` on ``sw_batch_size`` windows at a time and blends the window
outputs with a constant or Gaussian weight. Window placement, padding and weights follow
MONAI's ``monai.inferers.sliding_window_inference`` so results agree with it to float
precision: an input smaller than the window is zero-padded symmetrically (then cropped back),
windows start every ``int(roi * (1 - overlap))`` voxels and the last one is shifted to end at
the border, and the Gaussian has ``sigma = sigma_scale * roi`` per axis with weights clamped
at ``1e-3`` of the peak.

``slicewise_inference`` runs a 2D network over every slice of a 3D volume, batching slices as
COPLE-Net's reference does (``(B * D, C, H, W)``), optionally through a 2D sliding window when
slices are larger than the network's training size.

Both run under ``torch.no_grad()``, move windows to ``device`` (default: the input's device)
for the predictor, and return the stitched output on the input's device.

Example:
    >>> probs = sliding_window_inference(image[None], (96, 96, 96), model, overlap=0.5)
    >>> probs2d = slicewise_inference(image[None], coplenet, batch_size=16)
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["gaussian_importance_map", "slicewise_inference", "sliding_window_inference"]

logger = logging.getLogger(__name__)

Predictor = Callable[[Tensor], Tensor]


def gaussian_importance_map(
    roi_size: Sequence[int],
    *,
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | str | None = None,
) -> Tensor:
    """Separable Gaussian window weight of shape ``roi_size`` (at most 1, clamped below at 1e-3)."""
    scales = (
        [float(sigma_scale)] * len(roi_size)
        if isinstance(sigma_scale, (int, float))
        else [float(s) for s in sigma_scale]
    )
    if len(scales) != len(roi_size) or any(s <= 0 for s in scales):
        raise ValueError(f"sigma_scale must be positive, one per axis; got {sigma_scale!r}")
    weight = torch.ones((), device=device)
    for size, scale in zip(roi_size, scales, strict=True):
        x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0
        axis = torch.exp(x**2 / (-2.0 * (scale * size) ** 2))
        weight = weight.unsqueeze(-1) * axis
    return weight.clamp(min=max(float(weight.min()), 1e-3))


def _window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start offsets of windows of length ``roi`` covering ``size`` (``size >= roi``)."""
    step = roi if roi == size else max(int(roi * (1.0 - overlap)), 1)
    count = 1 + max(math.ceil((size - roi) / step), 0)
    return [min(i * step, size - roi) for i in range(count)]


def _resolve_roi(roi_size: Sequence[int] | int, spatial: Sequence[int]) -> tuple[int, ...]:
    roi = [roi_size] * len(spatial) if isinstance(roi_size, int) else list(roi_size)
    if len(roi) != len(spatial):
        raise ValueError(
            f"roi_size {tuple(roi)} has {len(roi)} axes but the input has {len(spatial)} "
            "spatial axes: give one window size per spatial axis"
        )
    # Like MONAI, a non-positive entry means "the whole axis".
    return tuple(int(r) if r > 0 else int(s) for r, s in zip(roi, spatial, strict=True))


def sliding_window_inference(
    inputs: Tensor,
    roi_size: Sequence[int] | int,
    predictor: Predictor,
    *,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    mode: Literal["gaussian", "constant"] = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """Predict a ``(B, C, *spatial)`` input (2 or 3 spatial axes) window by window.

    Args:
        inputs: the image batch; any device.
        roi_size: window size per spatial axis (an int for all axes; <= 0 = the whole axis).
        predictor: maps ``(n, C, *roi_size)`` to ``(n, C_out, *roi_size)``, e.g. a model.
        sw_batch_size: windows per predictor call (windows of all batch items are pooled).
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        mode: ``"gaussian"`` weights window centres more; ``"constant"`` averages plainly.
        sigma_scale: Gaussian sigma as a fraction of the window size.
        device: where windows are sent for the predictor; the output stays on the input's
            device either way.
        progress: show a tqdm bar over window batches.

    Returns:
        ``(B, C_out, *spatial)`` float tensor on ``inputs.device``.
    """
    if inputs.ndim not in (4, 5):
        raise ValueError(
            f"inputs must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(inputs.shape)}"
        )
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if mode not in ("gaussian", "constant"):
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    sw_device = torch.device(device) if device is not None else inputs.device
    spatial = tuple(inputs.shape[2:])
    roi = _resolve_roi(roi_size, spatial)

    # Pad symmetrically where the input is smaller than the window (F.pad lists axes last-first).
    pad: list[int] = []
    for size, r in zip(reversed(spatial), reversed(roi), strict=True):
        diff = max(r - size, 0)
        pad.extend([diff // 2, diff - diff // 2])
    padded = F.pad(inputs, pad) if any(pad) else inputs
    padded_spatial = tuple(padded.shape[2:])

    starts = [_window_starts(s, r, overlap) for s, r in zip(padded_spatial, roi, strict=True)]
    windows = [
        (b, tuple(slice(o, o + r) for o, r in zip(origin, roi, strict=True)))
        for b in range(inputs.shape[0])
        for origin in itertools.product(*starts)
    ]
    if mode == "gaussian":
        weight = gaussian_importance_map(roi, sigma_scale=sigma_scale, device=inputs.device)
    else:
        weight = torch.ones(roi, device=inputs.device)

    output: Tensor | None = None
    count = torch.zeros((inputs.shape[0], 1, *padded_spatial), device=inputs.device)
    chunks = range(0, len(windows), sw_batch_size)
    with torch.no_grad():
        for first in tqdm(chunks, desc="sliding window", disable=not progress):
            chunk = windows[first : first + sw_batch_size]
            batch = torch.cat([padded[(b, slice(None), *region)][None] for b, region in chunk])
            result = predictor(batch.to(sw_device))
            if not isinstance(result, Tensor) or result.shape[2:] != roi:
                shape = tuple(result.shape) if isinstance(result, Tensor) else type(result)
                raise ValueError(
                    f"predictor returned {shape} for windows of shape {tuple(batch.shape)}: "
                    "it must return one (n, C_out, *roi_size) tensor"
                )
            result = result.to(device=inputs.device, dtype=torch.float32)
            if output is None:
                output = torch.zeros(
                    (inputs.shape[0], result.shape[1], *padded_spatial), device=inputs.device
                )
            for (b, region), window_out in zip(chunk, result, strict=True):
                output[(b, slice(None), *region)] += window_out * weight
                count[(b, slice(None), *region)] += weight
    assert output is not None  # there is always at least one window
    output /= count
    crop = tuple(
        slice(before, before + size)
        for before, size in zip(reversed(pad[0::2]), spatial, strict=True)
    )
    return output[(slice(None), slice(None), *crop)]


def slicewise_inference(
    volume: Tensor,
    predictor_2d: Predictor,
    *,
    axis: int = -1,
    batch_size: int = 16,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    mode: Literal["gaussian", "constant"] = "gaussian",
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """Run a 2D network on every slice of a ``(B, C, *3 spatial)`` volume along ``axis``.

    ``axis`` is the spatial axis sliced through, counted over the whole tensor: ``-1`` (the
    default) is the last axis, the axial (Z) axis of fedmed's ``(B, C, X, Y, Z)`` volumes;
    use ``2`` for ``(B, C, D, H, W)`` volumes. Slices of all batch items are stacked to
    ``(B * D, C, H, W)`` and fed ``batch_size`` at a time; with ``roi_size`` each batch of
    slices goes through a 2D ``sliding_window_inference`` (``overlap``, ``mode``) instead.

    Returns:
        ``(B, C_out, *3 spatial)`` on the volume's device, slices back in place.
    """
    if volume.ndim != 5:
        raise ValueError(f"volume must be (B, C, *3 spatial), got shape {tuple(volume.shape)}")
    if axis not in (2, 3, 4, -1, -2, -3):
        raise ValueError(f"axis must be a spatial axis (2, 3, 4 or -3, -2, -1), got {axis}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    axis = axis % 5
    sw_device = torch.device(device) if device is not None else volume.device
    moved = volume.movedim(axis, 1)  # (B, D, C, H, W)
    b, d = moved.shape[:2]
    slices = moved.reshape(b * d, *moved.shape[2:])

    outputs: list[Tensor] = []
    with torch.no_grad():
        for first in tqdm(range(0, b * d, batch_size), desc="slices", disable=not progress):
            chunk = slices[first : first + batch_size]
            if roi_size is None:
                out = predictor_2d(chunk.to(sw_device))
            else:
                out = sliding_window_inference(
                    chunk,
                    roi_size,
                    predictor_2d,
                    sw_batch_size=batch_size,
                    overlap=overlap,
                    mode=mode,
                    device=sw_device,
                )
            if out.shape[0] != chunk.shape[0] or out.shape[2:] != chunk.shape[2:]:
                raise ValueError(
                    f"2D predictor returned {tuple(out.shape)} for slices {tuple(chunk.shape)}: "
                    "it must keep the batch and spatial sizes"
                )
            outputs.append(out.to(device=volume.device, dtype=torch.float32))
    stacked = torch.cat(outputs).reshape(b, d, -1, *slices.shape[2:])
    return stacked.movedim(1, axis)
