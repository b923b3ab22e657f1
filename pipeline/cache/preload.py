"""Load a split's cached features into memory once (heads train and evaluate from RAM).

Reads go through the dataset's own per-sample path (whole chunks read directly, see
pipeline.cache.shards); features stay in stored precision (float16) in memory.
"""

from __future__ import annotations

import copy

from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.cache.variants import VariantViews


class InMemoryDataset(Dataset):
    """Reader-format samples held in memory, as the reader yields them (stored precision)."""

    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return dict(self.samples[i])  # a copy: callers may replace keys


class VariantsInMemory(Dataset):
    """In-memory copies of one reader per prompt variant; `variant` selects, as on the reader."""

    def __init__(self, by_variant: dict[int, Dataset]) -> None:
        self.by_variant = by_variant
        self.variant = next(iter(by_variant))

    def __len__(self) -> int:
        return len(self.by_variant[self.variant])

    def __getitem__(self, i: int) -> dict:
        return self.by_variant[self.variant][i]


def preload(ds: Dataset, progress: bool = True) -> Dataset:
    """An in-memory copy of `ds`; VariantViews keep drawing variants, from memory."""
    if isinstance(ds, InMemoryDataset | VariantsInMemory):
        return ds
    if isinstance(ds, VariantViews):
        # Every variant the views can draw: a single frozen draw per image would end the
        # randomization after the first epoch.
        needed = [*ds.variants, *([] if ds.guided is None else [ds.guided])]
        readers = {}
        for v in dict.fromkeys(needed):
            reader = copy.copy(ds.base)
            reader.variant = v  # type: ignore[attr-defined]
            readers[v] = preload(reader, progress)
        views = copy.copy(ds)
        views.base = VariantsInMemory(readers)
        return views
    samples = [ds[i] for i in tqdm(range(len(ds)), desc="preload", disable=not progress)]
    return InMemoryDataset(samples)
