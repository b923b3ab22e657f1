"""Load a split's cached features into memory with whole-block reads (heads train from RAM).

Per-image zarr reads cost a few ms per array; the default recipe has 42 arrays per image, so
reading each sample per iteration would dominate training. One slice read per (store, tap) over
contiguous image runs is about 10x cheaper, and a split of the embedded default fits in memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.encoded import open_labels
from pipeline.reader import FeatureDataset
from pipeline.store import FeatureStore


class InMemoryDataset(Dataset):
    """Reader-format samples held in memory (features kept in their stored precision)."""

    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        out = {"features": {k: v.float() for k, v in s["features"].items()}, "index": s["index"]}
        if "label" in s:
            out["label"] = s["label"]
        return out

    def nbytes(self) -> int:
        return sum(
            v.numel() * v.element_size() for s in self.samples for v in s["features"].values()
        )


def preload(ds: Dataset, block: int = 64, progress: bool = True) -> Dataset:
    """An in-memory copy of `ds`; FeatureDatasets without random crop/flip/variant read in blocks."""
    if isinstance(ds, InMemoryDataset):
        return ds
    if not (
        isinstance(ds, FeatureDataset)
        and ds.crop is None
        and not ds.flip
        and ds.variant is not None
    ):
        return InMemoryDataset(
            [ds[i] for i in tqdm(range(len(ds)), desc="preload", disable=not progress)]
        )
    stores = [FeatureStore.open(p) for p in ds.store_paths]
    labels = open_labels(ds.encoded_dir) if ds.labels else None
    samples: list[dict] = [{"features": {}, "index": idx} for idx in ds.indices]
    runs = _runs(ds.indices, block)
    for pos, a, b in tqdm(runs, desc="preload", disable=not progress):
        for si, tap, key, _ in ds.entries:
            s = stores[si]
            x = np.asarray(s.group[f"features/{tap}"][a:b, ds.variant])
            if s.storage.kind == "int8":
                scale = np.asarray(s.group[f"scales/{tap}"][a:b, ds.variant], dtype=np.float32)
                x = x.astype(np.float32) * scale[:, :, None, None]
            t = torch.from_numpy(np.ascontiguousarray(x))
            if not t.is_floating_point() or t.dtype == torch.float64:
                t = t.float()
            for j in range(b - a):
                samples[pos + j]["features"][key] = t[j].clone()
        if labels is not None:
            lab = torch.from_numpy(np.asarray(labels[a:b]).astype(np.int64))
            for j in range(b - a):
                samples[pos + j]["label"] = lab[j]
    return InMemoryDataset(samples)


def _runs(indices: list[int], block: int) -> list[tuple[int, int, int]]:
    """(position in dataset, start, stop) of contiguous index runs, at most `block` long."""
    runs = []
    pos = 0
    while pos < len(indices):
        end = pos + 1
        while end < len(indices) and indices[end] == indices[end - 1] + 1 and end - pos < block:
            end += 1
        runs.append((pos, indices[pos], indices[pos] + (end - pos)))
        pos = end
    return runs
