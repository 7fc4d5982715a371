"""A trained network on whole volumes: predictions and AdaBN normalization statistics.

COPLE-Net (2D) predicts every axial slice of the volume, padded to a multiple of 16 for its
four poolings; the U-Nets (3D) predict with a sliding window of the training patch size
(25 % overlap, Gaussian blending, batched windows), or, with ``whole_volume=True``, in one
forward over the whole volume padded to a multiple of the poolings (LAMP's large-input
inference). ``cfg`` is the round's :class:`~fedmed.roundconfig.TrainConfig` (its ``spatial_dims``
and ``patch_size``).

A model split over devices (LAMP) keeps its placement: inputs go to its first stage's device
and the output comes back from the last. ``hardware`` applies the site's mixed precision and
channels-last layout (:class:`~fedmed.hardware.HardwareSettings`); the probabilities are float32.

Example:
    >>> label_map = predict_volume(model, item["image"], cfg)   # (X, Y, Z) class indices
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedmed.devices import input_device
from fedmed.inference import slicewise_inference, sliding_window_inference

if TYPE_CHECKING:
    from fedmed.hardware import HardwareSettings
    from fedmed.roundconfig import TrainConfig

__all__ = ["adapt_norm_statistics", "predict_volume"]

Predictor = Callable[[torch.Tensor], torch.Tensor]


def _predictor(model: nn.Module, hardware: HardwareSettings | None) -> Predictor:
    if hardware is None:
        return model

    def run(x: torch.Tensor) -> torch.Tensor:
        with hardware.autocast():
            return model(hardware.format_input(x)).float()

    return run


def _whole_volume(model: nn.Module, batch: torch.Tensor, predictor: Predictor) -> torch.Tensor:
    """One forward over the volume, zero-padded at the end of each axis to what the
    poolings divide, cropped back."""
    features = getattr(model, "features", None)
    factor = 2 ** (len(features) - 1) if features else 1
    spatial = batch.shape[2:]
    pad: list[int] = []
    for size in reversed(spatial):
        pad += [0, -size % factor]
    out = predictor(F.pad(batch, pad).to(input_device(model)))
    crop = tuple(slice(0, s) for s in spatial)
    return out[(slice(None), slice(None), *crop)].to(device=batch.device, dtype=torch.float32)


def _probabilities(
    model: nn.Module,
    image: torch.Tensor,
    cfg: TrainConfig,
    *,
    hardware: HardwareSettings | None = None,
    whole_volume: bool = False,
) -> torch.Tensor:
    """Class scores (1, C_out, X, Y, Z) of a (C, X, Y, Z) image, in the model's mode."""
    device = input_device(model)
    predictor = _predictor(model, hardware)
    batch = image.unsqueeze(0)
    if cfg.spatial_dims == 2:
        x, y = batch.shape[2:4]
        pad_x, pad_y = -x % 16, -y % 16  # COPLE-Net's four poolings need multiples of 16
        padded = F.pad(batch, (0, 0, 0, pad_y, 0, pad_x))
        return slicewise_inference(padded, predictor, batch_size=8, device=device)[:, :, :x, :y]
    if whole_volume:
        return _whole_volume(model, batch, predictor)
    return sliding_window_inference(batch, cfg.patch_size, predictor, device=device)


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: torch.Tensor,
    cfg: TrainConfig,
    *,
    hardware: HardwareSettings | None = None,
    whole_volume: bool = False,
) -> torch.Tensor:
    """Label map (X, Y, Z) for a (C, X, Y, Z) image: COPLE-Net on whole axial slices, the
    U-Nets with a sliding window of the patch size (25 % overlap, Gaussian blending) or, with
    ``whole_volume``, in one forward. ``hardware`` sets AMP and channels-last."""
    model.eval()
    scores = _probabilities(model, image, cfg, hardware=hardware, whole_volume=whole_volume)
    return scores[0].argmax(0)


@torch.no_grad()
def adapt_norm_statistics(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    cfg: TrainConfig,
    *,
    hardware: HardwareSettings | None = None,
) -> None:
    """AdaBN: re-estimate BatchNorm running statistics on unlabelled ``images`` (C, X, Y, Z).

    Under FedBN the global model has no trained normalization statistics (each site keeps its
    own); the server uses this to evaluate it on its held-out images. Only the images are used,
    never the labels; everything but the BatchNorm layers stays in eval mode. The statistics
    average over every batch the inference of each image runs (slices or windows).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch below
        m.train()
    try:
        for image in images:
            _probabilities(model, image, cfg, hardware=hardware)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
