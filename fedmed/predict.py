"""A trained network on whole volumes: predictions and AdaBN normalization statistics.

COPLE-Net (2D) predicts every axial slice of the volume, padded to a multiple of 16 for its
four poolings; the U-Nets (3D) predict with a sliding window of the training patch size
(25 % overlap, Gaussian blending, batched windows). ``cfg`` is the round's
:class:`~fedmed.task.TrainConfig` (its ``spatial_dims`` and ``patch_size``).

Example:
    >>> label_map = predict_volume(model, item["image"], cfg)   # (X, Y, Z) class indices
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedmed.inference import slicewise_inference, sliding_window_inference

if TYPE_CHECKING:
    from fedmed.task import TrainConfig

__all__ = ["adapt_norm_statistics", "predict_volume"]


def _probabilities(model: nn.Module, image: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Class probabilities (1, C_out, X, Y, Z) of a (C, X, Y, Z) image, in the model's mode."""
    device = next(model.parameters()).device
    batch = image.unsqueeze(0)
    if cfg.spatial_dims == 2:
        x, y = batch.shape[2:4]
        pad_x, pad_y = -x % 16, -y % 16  # COPLE-Net's four poolings need multiples of 16
        padded = torch.nn.functional.pad(batch, (0, 0, 0, pad_y, 0, pad_x))
        return slicewise_inference(padded, model, batch_size=8, device=device)[:, :, :x, :y]
    return sliding_window_inference(batch, cfg.patch_size, model, device=device)


@torch.no_grad()
def predict_volume(model: nn.Module, image: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Label map (X, Y, Z) for a (C, X, Y, Z) image: COPLE-Net on whole axial slices, the
    U-Nets with a sliding window of the patch size (25 % overlap, Gaussian blending)."""
    model.eval()
    return _probabilities(model, image, cfg)[0].argmax(0)


@torch.no_grad()
def adapt_norm_statistics(
    model: nn.Module, images: Sequence[torch.Tensor], cfg: TrainConfig
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
            _probabilities(model, image, cfg)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
