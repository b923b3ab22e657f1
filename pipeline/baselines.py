"""Baseline: a segmentation CNN trained from pixels, from scratch, on the same source images.

It plugs into the same SegModel / training loop / evaluation as the diffusion features: the
"fusion" is a small convolutional encoder reading features={"image": (B,3,H,W)} at stride 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from pipeline.errors import ModelError
from pipeline.fusion import Bottleneck, FusionConfig, group_norm
from pipeline.images import read_image, read_label

PIXEL_KEY = "image"


def pixel_fusion_config(widths: list[int], out_strides: list[int] | None = None) -> FusionConfig:
    """FusionConfig of the pixel encoder (input: RGB at stride 1)."""
    return FusionConfig(
        kind="pixels",
        inputs={PIXEL_KEY: [3, 1]},
        out_strides=list(out_strides or [4, 8, 16, 32]),
        widths=list(widths),
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


def load_image(path: str, resolution: Sequence[int]) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1], resized as encode resizes (PIL bilinear)."""
    h, w = int(resolution[0]), int(resolution[1])
    img = read_image(path)
    if img.shape[:2] != (h, w):
        img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1.0


def load_label(path: str, resolution: Sequence[int]) -> np.ndarray:
    """(H, W) uint8 train ids, resized as encode resizes (nearest)."""
    h, w = int(resolution[0]), int(resolution[1])
    lab = read_label(path)
    if lab.shape != (h, w):
        lab = np.asarray(Image.fromarray(lab).resize((w, h), Image.NEAREST))
    return lab


class PixelDataset(Dataset):
    """Images + labels of encode-index rows at the encode resolution, in the reader's format."""

    def __init__(self, index: pd.DataFrame, rows: Sequence[int], resolution: Sequence[int]) -> None:
        self.index = index
        self.rows = [int(r) for r in rows]
        self.resolution = (int(resolution[0]), int(resolution[1]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.index.iloc[self.rows[i]]
        # The same resizing as encode (without importing the diffusion stack), so labels equal
        # the feature reader's labels.
        img = load_image(row["image"], self.resolution)
        label = torch.from_numpy(load_label(row["label"], self.resolution).astype(np.int64))
        return {"features": {PIXEL_KEY: img}, "label": label, "index": self.rows[i]}
