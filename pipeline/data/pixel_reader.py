"""Images and labels of an encoded set's rows as a reader, for the from-pixels baseline."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor

from pipeline.data.images import load_image, load_label
from pipeline.data.samples import stacked_views

PIXEL_KEY = "image"  # the baseline's one "feature": the RGB image at stride 1


class PixelReader:
    """features {"image": (3, H, W)} and labels (H, W) of a set's rows, fitted to `resolution`
    as encode fits them (so labels equal the feature reader's). One draw, one variant."""

    draws = 1

    def __init__(self, rows: pd.DataFrame, resolution: Sequence[int]) -> None:
        self.rows = rows
        self.n_rows = len(rows)
        self.resolution = (int(resolution[0]), int(resolution[1]))

    def features(self, row: int, variant: int = 0) -> dict[str, Tensor]:
        return {PIXEL_KEY: load_image(self.rows.iloc[row]["image"], self.resolution)}

    def views(self, row: int, variants: Sequence[int]) -> dict[str, Tensor]:
        return stacked_views(self, row, variants)

    def label(self, row: int, draw: int = 0) -> Tensor:
        return torch.from_numpy(load_label(self.rows.iloc[row]["label"], self.resolution))
