"""The baseline's "fusion": a CNN trained from pixels, from scratch, in the same SegModel.

It reads features={"image": (B, 3, H, W)} at stride 1, so training, evaluation and the heads
are exactly those of the diffusion features.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.errors import ModelError
from pipeline.data.pixel_reader import PIXEL_KEY
from pipeline.heads.blocks import Bottleneck, group_norm
from pipeline.heads.fusion import FusionConfig


def pixel_fusion_config(widths: list[int], out_strides: list[int]) -> FusionConfig:
    """FusionConfig of the pixel encoder (input: RGB at stride 1)."""
    return FusionConfig(
        kind="pixels",
        inputs={PIXEL_KEY: [3, 1]},
        out_strides=list(out_strides),
        widths=list(widths),
        channels=0,
    )


class PixelEncoder(nn.Module):
    """ResNet-like encoder: stride-4 stem, then a stride-2 conv + bottleneck per output stride."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        strides, widths = list(cfg.out_strides), list(cfg.widths)
        if strides != sorted(strides) or strides[0] != 4 or len(widths) != len(strides):
            raise ModelError(f"pixel encoder needs increasing out_strides from 4, got {strides}")
        self.cfg = cfg
        w0 = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, w0, 3, stride=2, padding=1, bias=False),
            group_norm(w0),
            nn.ReLU(inplace=True),
            nn.Conv2d(w0, w0, 3, stride=2, padding=1, bias=False),
            group_norm(w0),
            nn.ReLU(inplace=True),
            Bottleneck(w0, w0),
        )
        stages = []
        for i in range(1, len(widths)):
            w = widths[i]
            if strides[i] != 2 * strides[i - 1]:
                raise ModelError(f"pixel encoder out_strides must double: {strides}")
            stages.append(
                nn.Sequential(
                    nn.Conv2d(widths[i - 1], w, 3, stride=2, padding=1, bias=False),
                    group_norm(w),
                    nn.ReLU(inplace=True),
                    Bottleneck(w, w),
                )
            )
        self.stages = nn.ModuleList(stages)
        self.out_specs = [(w, s) for w, s in zip(widths, strides, strict=True)]

    def forward(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        x = self.stem(features[PIXEL_KEY])
        outs = [x]
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs
