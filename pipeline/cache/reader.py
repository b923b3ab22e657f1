"""Cached features and labels of one encoded set as a reader; stores open lazily per process."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.cache.encoded import label_of, open_labels
from pipeline.cache.store import FeatureStore
from pipeline.core.errors import StoreError
from pipeline.core.names import FeatureKey
from pipeline.data.samples import Feature, Quantized

PathLike = str | os.PathLike[str]
# Reader threads pay off only for large samples (benchmarks/store_io.py, cold cache, 2 cores):
# the default's 273 KB samples of 4-100 KB chunks read 2.5x slower with 4 threads than with
# one (thread hand-offs and the GIL cost more than a small pread), SD-2.1's 56 MB samples of
# 1-10 MB chunks 1.6x faster.
PARALLEL_MIN_BYTES = 1 << 20


def tap_specs(store_paths: Sequence[PathLike]) -> dict[str, tuple[int, int]]:
    """{str(FeatureKey): (channels, stride)} over the stores, in store then tap order."""
    specs: dict[str, tuple[int, int]] = {}
    for p in store_paths:
        s = FeatureStore.open(p)
        for tap in s.taps:
            key = str(FeatureKey(s.identity.timestep, tap))
            specs[key] = (s.tap_info[tap]["channels"], s.tap_info[tap]["stride"])
    return specs


class FeatureReader:
    """One set's stores at several timesteps and its labels from data/encoded, by row.

    `features(row, variant)` gives {str(FeatureKey): (C, h, w)} as stored (float16, or int8
    values with their scales), `label(row, draw)` (H, W) uint8: few bytes through DataLoader
    workers and to the GPU; the training and evaluation steps decode there (to_device). `keys`
    limits the features to those a head reads (DIFF's finecoder drops stride 64). A sample is
    one chunk read per store and tap group; up to `threads` threads read a large sample's
    groups concurrently (PARALLEL_MIN_BYTES: `pread`, crc32c and numpy copies release the GIL).
    `labels=False`: features only (benchmarks of the stores alone).
    """

    def __init__(
        self,
        store_paths: Sequence[PathLike],
        *,
        encoded_dir: PathLike,
        set_name: str,
        keys: Sequence[str] | None = None,
        threads: int = 1,
        labels: bool = True,
    ) -> None:
        if not store_paths:
            raise StoreError("a feature reader needs at least one feature store")
        self.store_paths = [Path(p) for p in store_paths]
        self.encoded_dir = Path(encoded_dir)
        self.set_name = set_name
        stores = [FeatureStore.open(p) for p in self.store_paths]  # metadata only; not kept
        first = stores[0]
        for s in stores:
            if not s.is_complete():
                raise StoreError(
                    f"{s.path}: incomplete store (shards {s.missing_shards()} missing)"
                )
            for field in ("images", "resolution", "prompts", "draws", "encoding"):
                if getattr(s.identity, field) != getattr(first.identity, field):
                    raise StoreError(f"{s.path}: {field} differs from {first.path}")
        self.n_rows = first.n_images
        self.n_variants = first.identity.n_variants
        self.draws = first.identity.draws
        self.resolution: tuple[int, int] = tuple(first.identity.resolution)  # type: ignore[assignment]
        self.threads = max(1, int(threads))
        timesteps = [s.identity.timestep for s in stores]
        if len(set(timesteps)) != len(timesteps):
            raise StoreError(f"{self.store_paths}: two stores of one timestep ({timesteps})")
        # (store position, tap, key) of every feature this reader yields.
        self.entries = [
            (i, tap, str(FeatureKey(s.identity.timestep, tap)))
            for i, s in enumerate(stores)
            for tap in s.taps
            if keys is None or str(FeatureKey(s.identity.timestep, tap)) in keys
        ]
        self.sample_bytes = sum(
            int(np.prod(stores[i].stored_shape(tap))) * stores[i].storage.dtype.itemsize
            for i, tap, _ in self.entries
        )
        if self.sample_bytes < PARALLEL_MIN_BYTES:
            self.threads = 1
        # What one read_row call reads: (store position, taps, keys) per store, or per store and
        # tap group where threads read the groups' chunks side by side.
        units: dict[tuple[int, str], tuple[list[str], list[str]]] = {}
        for i, tap, key in self.entries:
            group = stores[i].tap_info[tap]["group"] if self.threads > 1 else ""
            taps, keys_ = units.setdefault((i, group), ([], []))
            taps.append(tap)
            keys_.append(key)
        self.reads = [(i, taps, keys_) for (i, _), (taps, keys_) in units.items()]
        self.labels = labels
        if labels:
            open_labels(self.encoded_dir, set_name)  # a clear error now, not in a worker
        self._pid: int | None = None
        self._stores: list[FeatureStore] = []
        self._labels: Any = None
        self._pool: ThreadPoolExecutor | None = None

    def open(self) -> None:
        """Open the stores in this process (a read does it when needed; handles are never
        shared across DataLoader worker forks)."""
        if self._pid != os.getpid():
            self._stores = [FeatureStore.open(p) for p in self.store_paths]
            self._labels = open_labels(self.encoded_dir, self.set_name) if self.labels else None
            self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
            self._pid = os.getpid()

    def features(self, row: int, variant: int = 0) -> dict[str, Feature]:
        """{key: (C, h, w)} of one row under one variant (prompt v // K, draw v % K): float16,
        or an int8 store's Quantized values and scales (decoded on the device: to_device)."""
        return {k: _first(x) for k, x in self.views(row, [variant]).items()}

    def views(self, row: int, variants: Sequence[int]) -> dict[str, Feature]:
        """{key: (V, C, h, w)}: `features` of each variant, stacked, read straight into one
        buffer per sample (each key's views and its scales are views of it: no stacking copy,
        and one shared-memory segment, not one per key, from a DataLoader worker)."""
        self.open()
        V = len(variants)
        if not all(0 <= v < self.n_variants for v in variants):
            raise StoreError(f"variants {list(variants)} out of range 0..{self.n_variants - 1}")
        # Every array of every key (values, then its mode's parts such as int8's scales), each
        # a view of one buffer; offsets aligned to 8 bytes so any dtype can view its bytes.
        arrays: list[tuple[str, str, np.dtype, tuple[int, ...]]] = []
        for i, tap, key in self.entries:
            mode, shape = self._stores[i].storage, self._stores[i].stored_shape(tap)
            arrays.append((key, "values", mode.dtype, shape))
            arrays += [(key, n, p.dtype, p.shape) for n, p in mode.parts(shape[0]).items()]
        sizes = [-(-V * int(np.prod(shape)) * dt.itemsize // 8) * 8 for *_, dt, shape in arrays]
        buffer = torch.empty(sum(sizes), dtype=torch.uint8)
        views: dict[str, dict[str, Tensor]] = {key: {} for _, _, key in self.entries}
        offset = 0
        for (key, name, dt, shape), size in zip(arrays, sizes, strict=True):
            n = V * int(np.prod(shape))
            flat = buffer[offset : offset + n * dt.itemsize].view(_torch_dtype(dt))
            views[key][name] = flat.view(V, *shape)
            offset += size

        def read(unit: tuple[int, list[str], list[str]]) -> None:
            # A unit's views in turn: no two threads share one array's open shard file.
            i, taps, keys = unit
            for v, variant in enumerate(variants):
                into = {n: [views[k][n][v].numpy() for k in keys] for n in views[keys[0]]}
                self._stores[i].read_into(taps, row, variant, **into)  # type: ignore[arg-type]

        list(map(read, self.reads) if self._pool is None else self._pool.map(read, self.reads))
        return {
            key: self._stores[i].storage.feature(
                views[key]["values"], {n: x for n, x in views[key].items() if n != "values"}
            )
            for i, _, key in self.entries
        }

    def label(self, row: int, draw: int = 0) -> Tensor:
        """(H, W) uint8 train ids of one row's draw."""
        self.open()
        if self._labels is None:
            raise StoreError(f"{self.set_name}: this reader was opened without labels")
        return torch.from_numpy(label_of(self._labels, row, draw))

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get the reader pickled (spawn) or forked: no thread pool in it.
        return {**self.__dict__, "_pool": None, "_pid": None, "_stores": [], "_labels": None}


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _first(x: Feature) -> Feature:
    """The first view of a (V, ...) feature (a Quantized is a tuple: index its parts)."""
    return Quantized(x.values[0], x.scales[0]) if isinstance(x, Quantized) else x[0]
