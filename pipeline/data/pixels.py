"""Images and labels of encode-index rows as a torch Dataset, for the from-pixels baseline."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pipeline.data.images import load_image, load_label

PIXEL_KEY = "image"  # the baseline's one "feature": the RGB image at stride 1


class PixelDataset(Dataset):
    """Samples {"features": {"image": (3, H, W)}, "label": (H, W) uint8, "index"} at `resolution`.

    The same resizing as encode, so labels equal the feature reader's labels.
    """

    def __init__(self, index: pd.DataFrame, rows: Sequence[int], resolution: Sequence[int]) -> None:
        self.index = index
        self.rows = [int(r) for r in rows]
        self.resolution = (int(resolution[0]), int(resolution[1]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.index.iloc[self.rows[i]]
        img = load_image(row["image"], self.resolution)
        label = torch.from_numpy(load_label(row["label"], self.resolution))
        return {"features": {PIXEL_KEY: img}, "label": label, "index": self.rows[i]}
