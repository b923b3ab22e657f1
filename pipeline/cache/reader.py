"""Cached features (and labels) as a torch Dataset; stores open lazily in each worker process."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.cache.encoded import open_labels
from pipeline.cache.store import FeatureStore
from pipeline.core.errors import StoreError
from pipeline.core.names import FeatureKey

PathLike = str | os.PathLike[str]


def tap_specs(store_paths: Sequence[PathLike]) -> dict[str, tuple[int, int]]:
    """{str(FeatureKey): (channels, stride)} over the stores, in store then tap order."""
    specs: dict[str, tuple[int, int]] = {}
    for p in store_paths:
        s = FeatureStore.open(p)
        for tap in s.taps:
            key = str(FeatureKey(s.identity.timestep, tap))
            specs[key] = (s.tap_info[tap]["channels"], s.tap_info[tap]["stride"])
    return specs


class FeatureDataset(Dataset):
    """Samples {"features": {str(FeatureKey): (C, h, w)}, "label": (H, W) uint8, "index": int}
    of one domain: its stores at several timesteps, and its canvas labels from data/encoded.

    Features come in stored precision (float16; float32 from int8 stores) and labels as uint8:
    few bytes through DataLoader workers and to the GPU; the training and evaluation steps
    cast. `variant` (prompt x noise draw) may be changed between reads (VariantViews does).
    `keys` limits the features read to those a head uses (DIFF's finecoder drops stride 64).
    `threads` read a sample's chunks concurrently (`pread`, crc32c and numpy copies release
    the GIL; benchmarks/store_io.py measures it).
    """

    def __init__(
        self,
        store_paths: Sequence[PathLike],
        indices: Sequence[int] | None = None,
        *,
        encoded_dir: PathLike,
        domain: str,
        variant: int = 0,
        labels: bool = True,
        keys: Sequence[str] | None = None,
        threads: int = 1,
    ) -> None:
        if not store_paths:
            raise StoreError("FeatureDataset needs at least one feature store")
        self.store_paths = [Path(p) for p in store_paths]
        self.encoded_dir = Path(encoded_dir)
        self.domain = domain
        stores = [FeatureStore.open(p) for p in self.store_paths]  # metadata only; not kept
        first = stores[0]
        for s in stores:
            if not s.is_complete():
                raise StoreError(
                    f"{s.path}: incomplete store (shards {s.missing_shards()} missing)"
                )
            for field in ("images", "resolution", "prompts", "draws"):
                if getattr(s.identity, field) != getattr(first.identity, field):
                    raise StoreError(f"{s.path}: {field} differs from {first.path}")
        self.n_images = first.n_images
        self.n_variants = first.identity.n_variants
        self.resolution: tuple[int, int] = tuple(first.identity.resolution)  # type: ignore[assignment]
        self.indices = list(range(self.n_images)) if indices is None else [int(i) for i in indices]
        if self.indices and not 0 <= min(self.indices) <= max(self.indices) < self.n_images:
            raise StoreError(f"indices out of range 0..{self.n_images - 1}")
        if not 0 <= variant < self.n_variants:
            raise StoreError(f"variant {variant} out of range 0..{self.n_variants - 1}")
        self.variant = variant
        self.labels = labels
        self.threads = max(1, int(threads))
        # (store position, tap, key) of every feature this dataset yields.
        self.entries = [
            (i, tap, str(FeatureKey(s.identity.timestep, tap)))
            for i, s in enumerate(stores)
            for tap in s.taps
            if keys is None or str(FeatureKey(s.identity.timestep, tap)) in keys
        ]
        if labels:
            open_labels(self.encoded_dir, domain)  # a clear error now, not in a worker
        self._pid: int | None = None
        self._stores: list[FeatureStore] = []
        self._labels: Any = None
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def _open(self) -> None:
        # Open per process: handles must not be shared across DataLoader worker forks.
        if self._pid != os.getpid():
            self._stores = [FeatureStore.open(p) for p in self.store_paths]
            self._labels = open_labels(self.encoded_dir, self.domain) if self.labels else None
            self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
            self._pid = os.getpid()

    def __getitem__(self, item: int) -> dict[str, Any]:
        self._open()
        idx, variant = self.indices[item], self.variant

        def read(entry: tuple[int, str, str]) -> torch.Tensor:
            store, tap = self._stores[entry[0]], entry[1]
            return torch.from_numpy(np.ascontiguousarray(store.read(tap, idx, variant)))

        values = self._pool.map(read, self.entries) if self._pool else map(read, self.entries)
        feats = {key: x for (_, _, key), x in zip(self.entries, values, strict=True)}
        sample: dict[str, Any] = {"features": feats, "index": idx}
        if self.labels:
            sample["label"] = torch.from_numpy(np.asarray(self._labels[idx], dtype=np.uint8))
        return sample

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get the dataset pickled (spawn) or forked: no thread pool in it.
        return {**self.__dict__, "_pool": None, "_pid": None, "_stores": [], "_labels": None}
