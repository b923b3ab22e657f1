"""A split in memory when it fits the loader's budget, else streamed from the store.

Preloading reads through the dataset's own per-sample path (whole chunks read directly, see
cache/shards.py); features stay in stored precision (float16) in memory. Streaming reads
each sample when a batch needs it, in DataLoader workers with reader threads.
"""

from __future__ import annotations

import copy
from typing import Annotated

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.cache.variants import VariantViews
from pipeline.core.params import STRICT, Positive


@dataclass(config=STRICT)
class LoaderConfig:
    """The `loader` group: how train and evaluate read the stores."""

    memory_budget_mb: Annotated[int, Field(ge=0)]  # preload a split only if it fits; 0: stream
    read_threads: Positive  # per reading process, over a sample's taps and timesteps
    workers: Annotated[int, Field(ge=0)]  # DataLoader worker processes (0: in the loop's own)
    prefetch: Positive  # batches each worker reads ahead


def sample_bytes(sample: dict) -> int:
    """Bytes of one reader sample's tensors (features, label)."""
    tensors = [*sample["features"].values(), *([sample["label"]] if "label" in sample else [])]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def split_bytes(ds: Dataset) -> int:
    """Bytes a preload of `ds` would hold (every variant VariantViews can draw)."""
    copies = 1
    if isinstance(ds, VariantViews):
        copies = len(dict.fromkeys([*ds.variants, *([] if ds.guided is None else [ds.guided])]))
        ds = ds.base
    return copies * len(ds) * sample_bytes(ds[0]) if len(ds) else 0


def within_budget(ds: Dataset, cfg: LoaderConfig, what: str) -> Dataset:
    """`ds` preloaded when its split fits `cfg.memory_budget_mb`, else `ds` itself (streamed);
    the choice is printed."""
    need = split_bytes(ds) / 2**20
    if need <= cfg.memory_budget_mb:
        print(
            f"{what}: preloading {len(ds)} samples ({need:.0f} MiB <= loader.memory_budget_mb "
            f"{cfg.memory_budget_mb})",
            flush=True,
        )
        return preload(ds)
    print(
        f"{what}: streaming {len(ds)} samples from the store ({need:.0f} MiB > "
        f"loader.memory_budget_mb {cfg.memory_budget_mb})",
        flush=True,
    )
    return ds


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
