"""Building blocks shared by fusion, heads and the pixel baseline."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ModelError


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 32 that divides `channels`."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


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
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, GroupNorm) with a projection shortcut."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None) -> None:
        super().__init__()
        mid = mid_ch or max(out_ch // 4, 8)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.norm1 = group_norm(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.norm2 = group_norm(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.norm3 = group_norm(out_ch)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), group_norm(out_ch))
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
