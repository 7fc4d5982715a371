"""A standard 3D U-Net built as a flat sequence of cells, so LAMP can cut it across devices.

Every cell maps a *state* to a state. A state is a tuple of tensors ``(x, *skips)``: the
feature map flowing down the network followed by the stack of skip tensors the encoder has
pushed and the decoder has not yet popped (most recent last). Passing the whole state from
cell to cell means any contiguous run of cells is a pipeline stage: a stage needs nothing
but the state its predecessor hands over.

Cells, for ``features=(f0, ..., fL)``: ``L + 1`` encoder cells (level 0: two conv-norm-act;
levels 1..L: 2x max-pool then two conv-norm-act; levels 0..L-1 push their output), ``L``
decoder cells (2x transposed conv, pop and concatenate the skip, two conv-norm-act), a 1x1
head. With ``skip_connections=False`` nothing is pushed or popped (the LAMP paper's
parallel U-Net, whose stages depend only on the one before).

Example:
    >>> net = UNet3D(in_channels=1, out_channels=2, features=(8, 16, 32))
    >>> net(torch.zeros(1, 1, 16, 16, 16)).shape
    torch.Size([1, 2, 16, 16, 16])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DecoderCell", "EncoderCell", "HeadCell", "State", "UNet3D", "build_unet_cells"]

State = tuple[torch.Tensor, ...]


class ConvBlock3d(nn.Sequential):
    """(3x3x3 conv, norm, act) twice, with optional dropout between the two."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        norm: type[nn.Module],
        act: type[nn.Module],
        dropout: float,
    ) -> None:
        # No conv bias: the norm right after it removes any constant offset.
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            norm(out_channels, affine=True),
            act(),
            nn.Dropout3d(dropout),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            norm(out_channels, affine=True),
            act(),
        )


class EncoderCell(nn.Module):
    """Optional 2x max-pool, a conv block, and (when ``push``) its output pushed as a skip."""

    def __init__(self, block: nn.Module, *, pool: bool, push: bool) -> None:
        super().__init__()
        self.pool = nn.MaxPool3d(2) if pool else nn.Identity()
        self.block = block
        self.push = push

    def forward(self, *state: torch.Tensor) -> State:
        x, skips = state[0], state[1:]
        x = self.block(self.pool(x))
        return (x, *skips, x) if self.push else (x, *skips)


class DecoderCell(nn.Module):
    """2x transposed-conv up-sampling, (when ``pop``) concatenation with the last skip, a block."""

    def __init__(self, in_channels: int, out_channels: int, block: nn.Module, *, pop: bool) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2)
        self.block = block
        self.pop = pop

    def forward(self, *state: torch.Tensor) -> State:
        x, skips = self.up(state[0]), state[1:]
        if self.pop:
            x, skips = torch.cat([skips[-1], x], dim=1), skips[:-1]
        return (self.block(x), *skips)


class HeadCell(nn.Module):
    """1x1x1 convolution to the output channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, *state: torch.Tensor) -> State:
        return (self.conv(state[0]), *state[1:])


def _check_options(
    in_channels: int, out_channels: int, features: Sequence[int], dropout: float
) -> tuple[int, ...]:
    if in_channels <= 0 or out_channels <= 0:
        raise ValueError(
            f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}"
        )
    features = tuple(features)
    if len(features) < 2 or any(not isinstance(f, int) or f <= 0 for f in features):
        raise ValueError(
            f"features must be at least 2 positive ints (one per level), got {features!r}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return features


def build_unet_cells(
    *,
    in_channels: int,
    out_channels: int,
    features: Sequence[int],
    norm: type[nn.Module] = nn.InstanceNorm3d,
    act: type[nn.Module] = nn.LeakyReLU,
    dropout: float = 0.0,
    skip_connections: bool = True,
) -> nn.ModuleList:
    """The U-Net's cells in execution order (arguments as in ``UNet3D``)."""
    f = _check_options(in_channels, out_channels, features, dropout)
    depth = len(f) - 1
    options = {"norm": norm, "act": act, "dropout": dropout}
    cells: list[nn.Module] = []
    for level in range(depth + 1):
        block = ConvBlock3d(in_channels if level == 0 else f[level - 1], f[level], **options)
        push = skip_connections and level < depth
        cells.append(EncoderCell(block, pool=level > 0, push=push))
    for level in reversed(range(depth)):
        block_in = 2 * f[level] if skip_connections else f[level]
        block = ConvBlock3d(block_in, f[level], **options)
        cells.append(DecoderCell(f[level + 1], f[level], block, pop=skip_connections))
    cells.append(HeadCell(f[0], out_channels))
    return nn.ModuleList(cells)


class UNet3D(nn.Module):
    """A 3D U-Net (conv-norm-act x2 per level, max-pool down, transposed-conv up) as cells.

    Args:
        in_channels: input channels.
        out_channels: output channels (classes, background included).
        features: channels per level, shallowest first; ``len(features) - 1`` poolings, so
            spatial sizes must be divisible by ``2 ** (len(features) - 1)``.
        norm: normalization class, built as ``norm(channels, affine=True)``
            (``nn.InstanceNorm3d`` or ``nn.BatchNorm3d``).
        act: activation class, instantiated without arguments.
        dropout: channel dropout inside every conv block.
        skip_connections: ``False`` drops the long-range skips (LAMP's parallel U-Net).

    The state_dict keys are ``cells.<i>....``, the same for every subclass and placement.

    Example:
        >>> net = UNet3D(in_channels=1, out_channels=3, features=(8, 16), norm=nn.BatchNorm3d)
        >>> net(torch.zeros(2, 1, 8, 8, 8)).shape
        torch.Size([2, 3, 8, 8, 8])
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 320),
        norm: type[nn.Module] = nn.InstanceNorm3d,
        act: type[nn.Module] = nn.LeakyReLU,
        dropout: float = 0.0,
        skip_connections: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.features = tuple(features)
        self.skip_connections = skip_connections
        self.cells = build_unet_cells(
            in_channels=in_channels,
            out_channels=out_channels,
            features=features,
            norm=norm,
            act=act,
            dropout=dropout,
            skip_connections=skip_connections,
        )

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is (B, C, D, H, W) with sizes the poolings divide."""
        factor = 2 ** (len(self.features) - 1)
        if x.ndim != 5 or any(s % factor for s in x.shape[2:]):
            raise ValueError(
                f"{type(self).__name__} expects (B, C, D, H, W) with D, H, W divisible by "
                f"{factor}, got {tuple(x.shape)}: pad or crop the input"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, D, H, W) -> (B, out_channels, D, H, W) logits."""
        self.check_input(x)
        state: State = (x,)
        for cell in self.cells:
            state = cell(*state)
        return state[0]
