"""Building blocks shared by fusion, heads and the pixel baseline."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ModelError


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `channels`."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """`gn` (group_norm) or `bn` (BatchNorm2d)."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return group_norm(channels)
    raise ModelError(f"unknown norm {kind!r} (gn | bn)")


def conv_norm_act(in_ch: int, out_ch: int, k: int, norm: str, **kw: int) -> nn.Sequential:
    """Conv (no bias) -> norm -> ReLU, as mmcv's ConvModule."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, k, bias=False, **kw),
        norm_layer(norm, out_ch),
        nn.ReLU(inplace=True),
    )


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, GroupNorm) with a projection shortcut.

    As detectron2's BottleneckBlock, which DIFF uses with 16 groups and out/4 middle channels.
    """

    def __init__(
        self, in_ch: int, out_ch: int, mid_ch: int | None = None, groups: int = 32
    ) -> None:
        super().__init__()
        mid = mid_ch or max(out_ch // 4, 8)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.norm1 = group_norm(mid, groups)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.norm2 = group_norm(mid, groups)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.norm3 = group_norm(out_ch, groups)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), group_norm(out_ch, groups))
            if in_ch != out_ch
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) maps to `size` (a no-op when already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ResBlock(nn.Module):
    """DIFF's finecoder ResBlock: conv3x3 -> GN -> ReLU -> conv3x3 -> GN, + input, ReLU."""

    def __init__(self, ch: int, groups: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.gn1 = group_norm(ch, groups)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.gn2 = group_norm(ch, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.gn1(self.conv1(x)))
        return F.relu(self.gn2(self.conv2(y)) + x)


def kaiming_fan_out(module: nn.Module) -> None:
    """Convolutions kaiming-normal (fan out, ReLU), biases 0, norms 1 and 0: DIFF's weights_init
    and mmcv ConvModule's own init alike."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm | nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
