"""COPLE-Net, the 2D noise-robust COVID-19 lesion segmentation network (Wang et al., TMI 2020).

Block by block the same network as the authors' reference (HiLab-git/COPLE-Net, PyMIC's
``COPLENet``): with ``in_channels=1``, ``out_channels=2`` and the default features it has
10,521,666 parameters. Module names differ from the reference (loops instead of four
hand-written bridge/down/up blocks), so the reference's checkpoint keys do not load as is.

``norm="group"`` replaces every batch norm by a group norm (``GROUP_NORM_GROUPS`` groups, fewer
where a layer has fewer channels): the variant DP-SGD needs, since batch norm mixes the records
of a batch (:mod:`fedmed.security.dpsgd`). Same parameters and state_dict keys for the weights;
group norm keeps no running statistics.

Example:
    >>> net = COPLENet(in_channels=1, out_channels=2)
    >>> net(torch.zeros(2, 1, 64, 64)).shape
    torch.Size([2, 2, 64, 64])
    >>> net(torch.zeros(1, 1, 3, 64, 64)).shape  # (B, C, D, H, W): slices folded into the batch
    torch.Size([1, 2, 3, 64, 64])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

__all__ = ["GROUP_NORM_GROUPS", "COPLENet"]

GROUP_NORM_GROUPS = 8

Norm = Callable[[int], nn.Module]  # channels -> normalization layer


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(channels, GROUP_NORM_GROUPS), channels)


def _norm_factory(norm: type[nn.Module] | Literal["batch", "group"]) -> Norm:
    """``norm(channels)`` builder; nn.GroupNorm's (groups, channels) signature handled here."""
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group" or norm is nn.GroupNorm:
        return _group_norm
    if isinstance(norm, type) and issubclass(norm, nn.Module):
        return norm
    raise ValueError(
        f"norm must be 'batch', 'group' or a normalization class, got {norm!r}; 'group' for DP-SGD"
    )


class ConvNormAct(nn.Sequential):
    """``kernel_size`` convolution, norm, activation (the reference's ``ConvLayer``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 1,
        norm: Norm,
        act: type[nn.Module],
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2),
            norm(out_channels),
            act(),
        )


class SEBlock(nn.Module):
    """Squeeze-and-excitation with a residual: ``x * gate(x) + x``; ``gate`` ends in ReLU."""

    def __init__(self, channels: int, *, reduction: int = 2, act: type[nn.Module]) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels // reduction, kernel_size=1),
            act(),
            nn.Conv2d(channels // reduction, channels, kernel_size=1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x) * x + x


class ConvBlock(nn.Sequential):
    """conv3-norm-act, dropout, conv3-norm-act, squeeze-excitation (reference:
    ``ConvBNActBlock``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        dropout: float,
        norm: Norm,
        act: type[nn.Module],
    ) -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, kernel_size=3, norm=norm, act=act),
            nn.Dropout(dropout),
            ConvNormAct(out_channels, out_channels, kernel_size=3, norm=norm, act=act),
            SEBlock(out_channels, act=act),
        )


class DownBlock(nn.Module):
    """Concatenated max- and average-pooling, a ``ConvBlock``, and a residual around it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        dropout: float,
        norm: Norm,
        act: type[nn.Module],
    ) -> None:
        super().__init__()
        self.max_pool = nn.MaxPool2d(2)
        self.avg_pool = nn.AvgPool2d(2)
        self.conv = ConvBlock(2 * in_channels, out_channels, dropout=dropout, norm=norm, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([self.max_pool(x), self.avg_pool(x)], dim=1)
        return self.conv(pooled) + pooled


class UpBlock(nn.Module):
    """1x1 conv to the skip's width, bilinear 2x up-sampling, concat with the skip, a ConvBlock."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        *,
        dropout: float,
        norm: Norm,
        act: type[nn.Module],
    ) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, skip_channels, kernel_size=1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = ConvBlock(2 * skip_channels, out_channels, dropout=dropout, norm=norm, act=act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([skip, self.up(self.reduce(x))], dim=1)
        return self.conv(joined) + joined


class ASPP(nn.Module):
    """Four parallel convolutions (kernels 1,3,3,3; dilations 1,2,4,6), concat, 1x1
    conv-norm-act."""

    def __init__(self, channels: int, *, norm: Norm, act: type[nn.Module]) -> None:
        super().__init__()
        branch = channels // 4
        self.branches = nn.ModuleList(
            nn.Conv2d(
                channels, branch, kernel, dilation=dilation, padding=(kernel - 1) // 2 * dilation
            )
            for kernel, dilation in ((1, 1), (3, 2), (3, 4), (3, 6))
        )
        self.fuse = ConvNormAct(4 * branch, 4 * branch, kernel_size=1, norm=norm, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))


def _validate(features: Sequence[int], dropout: Sequence[float]) -> tuple[int, ...]:
    features = tuple(features)
    if len(features) != 5 or any(not isinstance(f, int) or f <= 0 for f in features):
        raise ValueError(f"features must be 5 positive ints, got {features!r}")
    if features[0] % 4 or any(b != 2 * a for a, b in itertools.pairwise(features)):
        raise ValueError(
            f"features must double at each level from a multiple of 4 (the residuals add "
            f"pooled and convolved maps), got {features!r}; e.g. (32, 64, 128, 256, 512)"
        )
    if len(dropout) != 5 or any(not 0.0 <= p < 1.0 for p in dropout):
        raise ValueError(f"dropout must be 5 probabilities in [0, 1), got {tuple(dropout)!r}")
    return features


class COPLENet(nn.Module):
    """COPLE-Net: a 2D U-Net with MaxAvgPool down-sampling, SE residual blocks, 1x1 bridge
    convolutions halving the skips, an ASPP bottleneck and bilinear up-sampling.

    Args:
        in_channels: input channels (1 for CT).
        out_channels: output channels (classes, background included).
        features: channels of the five encoder levels; each level doubles the previous one.
        dropout: dropout of the five encoder levels; the decoder reuses levels 3..0, i.e.
            (0.4, 0.3, 0, 0) with the default.
        act: activation class, instantiated without arguments.
        norm: ``"batch"`` (the reference), ``"group"`` (for DP-SGD: group norm, see the module
            docstring) or a normalization class built as ``norm(channels)``.

    Example:
        >>> net = COPLENet(in_channels=1, out_channels=2, features=(8, 16, 32, 64, 128))
        >>> net(torch.zeros(1, 1, 32, 32)).shape
        torch.Size([1, 2, 32, 32])
        >>> net = COPLENet(features=(8, 16, 32, 64, 128), norm="group")
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        dropout: Sequence[float] = (0.0, 0.0, 0.3, 0.4, 0.5),
        act: type[nn.Module] = nn.LeakyReLU,
        norm: type[nn.Module] | Literal["batch", "group"] = "batch",
    ) -> None:
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(
                f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}"
            )
        f = _validate(features, dropout)
        layers = {"norm": _norm_factory(norm), "act": act}
        self.features = f
        self.in_conv = ConvBlock(in_channels, f[0], dropout=dropout[0], **layers)
        self.downs = nn.ModuleList(
            DownBlock(f[i], f[i + 1], dropout=dropout[i + 1], **layers) for i in range(4)
        )
        self.bridges = nn.ModuleList(ConvNormAct(f[i], f[i] // 2, **layers) for i in range(4))
        self.aspp = ASPP(f[4], **layers)
        # Decoder level i (deepest first) joins level i+1's output with bridge i's halved skip.
        self.ups = nn.ModuleList(
            UpBlock(f[i + 1], f[i] // 2, f[i], dropout=dropout[i], **layers)
            for i in reversed(range(4))
        )
        self.out_conv = nn.Conv2d(f[0], out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_channels, H, W); (B, C, D, H, W) -> (B, out_channels, D, H, W).

        A 5D input is cut into its D axial slices, run as one batch of B*D, and stacked back.
        H and W must be divisible by 16.
        """
        if x.ndim not in (4, 5):
            raise ValueError(
                f"COPLENet expects (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}"
            )
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(
                f"COPLENet needs H and W divisible by 16 (four 2x poolings), got {tuple(x.shape)}: "
                "pad or crop the input"
            )
        volume_shape = x.shape if x.ndim == 5 else None
        if volume_shape is not None:
            b, c, d, h, w = volume_shape
            x = x.transpose(1, 2).reshape(b * d, c, h, w)
        x = self.in_conv(x)
        skips = []
        for bridge, down in zip(self.bridges, self.downs, strict=True):
            skips.append(bridge(x))
            x = down(x)
        x = self.aspp(x)
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            x = up(x, skip)
        out = self.out_conv(x)
        if volume_shape is not None:
            b, _, d, h, w = volume_shape
            out = out.reshape(b, d, -1, h, w).transpose(1, 2)
        return out
