"""A tiny learnable set as a reader (features derived from the label), and training data on it."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from pipeline.cache.variants import Views
from pipeline.core.classes import IGNORE_INDEX, NUM_CLASSES
from pipeline.data.samples import RowsDataset, Sample, stacked_views
from pipeline.data.sampling import pixel_counts
from pipeline.loops.train import TrainData

SPECS = {"t50/up.0": (16, 32), "t50/up.1": (12, 16), "t50/up.2": (8, 8), "t150/up.2": (8, 8)}
CLASSES_USED = (0, 2, 8, 10, 13)


def make_label(g: torch.Generator, size: tuple[int, int]) -> torch.Tensor:
    H, W = size
    lab = torch.full((H, W), CLASSES_USED[0], dtype=torch.int64)
    lab[: H // 3] = 10  # sky on top
    for _ in range(3):
        c = CLASSES_USED[int(torch.randint(1, len(CLASSES_USED), (1,), generator=g))]
        y = int(torch.randint(0, H - 16, (1,), generator=g))
        x = int(torch.randint(0, W - 16, (1,), generator=g))
        lab[y : y + 16, x : x + 24] = c
    lab[-4:, :8] = IGNORE_INDEX
    return lab


class SyntheticFeatures(Dataset):
    """Features = fixed random projection of the pooled one-hot label + noise, per key/stride.

    A reader (one draw, one variant) and, indexed, the split of all its rows."""

    draws = 1

    def __init__(
        self, n: int, size: tuple[int, int] = (64, 128), seed: int = 0, noise: float = 0.5
    ):
        g = torch.Generator().manual_seed(seed)
        proj_g = torch.Generator().manual_seed(1234)  # the same "UNet" for every split
        self.proj = {
            k: torch.randn(c, NUM_CLASSES, generator=proj_g) for k, (c, _) in SPECS.items()
        }
        self.samples = []
        for i in range(n):
            lab = make_label(g, size)
            onehot = F.one_hot(lab.clamp(max=NUM_CLASSES - 1), NUM_CLASSES).permute(2, 0, 1).float()
            feats = {}
            for k, (_, s) in SPECS.items():
                pooled = F.avg_pool2d(onehot[None], s)[0]
                x = torch.einsum("cn,nhw->chw", self.proj[k], pooled)
                feats[k] = x + noise * torch.randn(x.shape, generator=g)
            self.samples.append(Sample(feats, lab.to(torch.uint8), i))
        self.n_rows = n

    def features(self, row: int, variant: int = 0) -> dict[str, Tensor]:
        return self.samples[row].features

    def views(self, row: int, variants: list[int]) -> dict[str, Tensor]:
        return stacked_views(self, row, variants)

    def label(self, row: int, draw: int = 0) -> Tensor:
        return self.samples[row].label

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def train_data(reader, val=None, views: Views | None = None, draw_pixels=None) -> TrainData:
    """Training data over every row of `reader` (its val split: every row of `val`)."""
    rows = list(range(reader.n_rows))
    counts = np.stack([pixel_counts(reader.label(r).numpy()) for r in rows])
    return TrainData(
        reader,
        rows,
        dict(SPECS),
        views or Views((0,), reader.draws),
        counts,
        draw_pixels,
        "",
        None if val is None else RowsDataset(val, list(range(val.n_rows))),
    )
