"""LAMP: a deep 3D U-Net split into cells across devices with GPipe micro-batches (Zhu et al.,
MICCAI 2020), so large inputs, up to a whole volume, fit.

The model is ``UNet3D``'s cell sequence plus a placement: each cell sits on its stage's
device, and ``forward`` pipelines micro-batches through the stages (``fedmed.nets.pipeline``).
The module tree is the single-device model's, so the state_dict keys are identical whatever
the device count: sites with one GPU and sites with four federate the same weights.

Two variants, one option: ``skip_connections=True`` keeps the U-Net's skips and carries them
through the stages (the authors' code, torchgpipe stash/pop); ``False`` is the paper's
parallel U-Net (its Figure 4) whose stages depend only on the one before.

Norm: instance norm by default. Batch norm works but, as in GPipe, its statistics are then
per micro-batch (and checkpointing updates the running statistics twice), so with
``chunks > 1`` it no longer equals the unpartitioned model; a warning is logged.

Example:
    >>> net = LAMPUNet(features=(8, 16, 32), devices=["cpu", "cpu"], chunks=2,
    ...                sample_shape=(1, 1, 16, 16, 16))
    >>> sum(net.placement.sizes)  # cells per device, e.g. (3, 3)
    6
    >>> net(torch.zeros(2, 1, 16, 16, 16)).shape
    torch.Size([2, 2, 16, 16, 16])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from fedmed.nets.partition import Balance, Partition, partition_cells
from fedmed.nets.pipeline import run_pipeline, stage_device
from fedmed.nets.unet3d import UNet3D

__all__ = ["LAMPUNet"]

logger = logging.getLogger(__name__)


class LAMPUNet(UNet3D):
    """A 3D U-Net pipelined over ``devices`` (LAMP); one device (or none) means no split.

    Args:
        in_channels, out_channels, features, norm, act, dropout, skip_connections: as in
            ``UNet3D`` (default features: the paper's U-Net-32, five levels).
        devices: devices of the stages, e.g. ``["cuda:0", "cuda:1"]`` or ``["cpu", "cpu"]``;
            ``None`` keeps every cell where it is (one stage).
        balance: ``"memory"`` (the reference's choice) or ``"time"`` to balance the profiled
            per-cell cost, or explicit cells per stage.
        chunks: micro-batches per batch (the reference uses 4).
        checkpoint: activation checkpointing per (micro-batch, stage).
        sample_shape: input shape profiled for balancing, default ``(1, in_channels, 64, 64, 64)``.

    ``forward`` returns its output on the last stage's device (``output_device``).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        norm: type[nn.Module] = nn.InstanceNorm3d,
        act: type[nn.Module] = nn.LeakyReLU,
        dropout: float = 0.0,
        skip_connections: bool = True,
        devices: Sequence[str | torch.device] | None = None,
        balance: Balance | Sequence[int] = "memory",
        chunks: int = 4,
        checkpoint: bool = True,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            features=features,
            norm=norm,
            act=act,
            dropout=dropout,
            skip_connections=skip_connections,
        )
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be a positive int, got {chunks!r}")
        self.chunks = chunks
        self.checkpoint = checkpoint
        if chunks > 1 and norm in (nn.BatchNorm3d, nn.SyncBatchNorm):
            logger.warning(
                "LAMPUNet with %s and chunks=%d normalises each micro-batch separately; "
                "use nn.InstanceNorm3d to match the unpartitioned model",
                norm.__name__,
                chunks,
            )
        self.placement = Partition((len(self.cells),), (), "none")
        if devices is not None:
            self.partition(devices, balance=balance, sample_shape=sample_shape)

    def partition(
        self,
        devices: Sequence[str | torch.device],
        *,
        balance: Balance | Sequence[int] = "memory",
        sample_shape: Sequence[int] | None = None,
    ) -> Partition:
        """Profile the cells on ``sample_shape``, split them over ``devices`` and move them there.

        ``sample_shape`` defaults to ``(1, in_channels, 64, 64, 64)``; with explicit stage
        sizes in ``balance`` nothing is profiled. Keeps the training/eval mode and the weights;
        gradients are cleared. Returns the new placement.
        """
        mode = self.training
        shape = tuple(sample_shape) if sample_shape else (1, self.in_channels, 64, 64, 64)
        sample = torch.randn(*shape)
        self.check_input(sample)
        # Profile in training mode: that is where activations are kept for backward.
        self.train()
        self.placement = partition_cells(self.cells, devices, sample, balance=balance)
        self.train(mode)
        logger.info(
            "LAMPUNet: %d cells as stages %s on %s (balance=%s)",
            len(self.cells),
            self.placement.sizes,
            [str(d) for d in self.placement.devices],
            self.placement.balance,
        )
        return self.placement

    @property
    def output_device(self) -> torch.device:
        """Where ``forward`` returns its output: the last stage's device."""
        return stage_device(self.cells[-1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, D, H, W) -> (B, out_channels, D, H, W) on ``output_device``."""
        self.check_input(x)
        return run_pipeline(
            self.cells, self.placement.sizes, x, chunks=self.chunks, checkpoint=self.checkpoint
        )
