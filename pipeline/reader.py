"""Read cached features (and labels) as a torch Dataset; arrays open lazily in each worker."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pipeline.encoded import LABELS_NAME, open_labels, read_index
from pipeline.errors import StoreError
from pipeline.store import FeatureStore

PathLike = str | os.PathLike[str]


def feature_key(timestep: int, tap: str) -> str:
    """The key of a tap in a sample's `features` dict."""
    return f"t{timestep}/{tap}"


def tap_specs(store_paths: Sequence[PathLike]) -> dict[str, tuple[int, int]]:
    """{f"t{t}/{tap}": (channels, stride)} over the stores, in store then tap order."""
    specs: dict[str, tuple[int, int]] = {}
    for p in store_paths:
        s = FeatureStore.open(p)
        for tap in s.taps:
            specs[feature_key(s.identity.timestep, tap)] = (
                s.tap_info[tap]["channels"],
                s.tap_info[tap]["stride"],
            )
    return specs


def select_indices(
    index: pd.DataFrame,
    domains: str | Sequence[str] | None = None,
    split: str | None = None,
) -> list[int]:
    """Global image indices (row positions of the encode index) of some domains / one split."""
    keep = np.ones(len(index), dtype=bool)
    if domains is not None:
        keep &= index["domain"].isin([domains] if isinstance(domains, str) else list(domains))
    if split is not None:
        keep &= (index["split"] == split).to_numpy()
    return [int(i) for i in np.flatnonzero(keep)]


class FeatureDataset(Dataset):
    """Samples dict(features={"t<t>/<tap>": (C,h,w)}, label=int64 (H,W), index=int).

    Features come in stored precision (float16; float32 from int8 stores): half the bytes
    through DataLoader workers and to the GPU; the training and evaluation steps cast.

    `crop=(h, w)` in image pixels (multiple of the largest stride) takes a random window,
    read as zarr slices; `flip` mirrors horizontally with p=0.5; `variant=None` draws a random
    variant (prompt x noise draw) per sample. Randomness comes from torch's global generator,
    which DataLoader seeds per worker.
    """

    def __init__(
        self,
        store_paths: Sequence[PathLike],
        indices: Sequence[int] | None = None,
        *,
        encoded_dir: PathLike = "data/encoded",
        variant: int | None = 0,
        crop: tuple[int, int] | None = None,
        flip: bool = False,
        labels: bool = True,
        taps: Sequence[str] | None = None,
    ) -> None:
        if not store_paths:
            raise StoreError("FeatureDataset needs at least one feature store")
        self.store_paths = [Path(p) for p in store_paths]
        self.encoded_dir = Path(encoded_dir)
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
        if variant is not None and not 0 <= variant < self.n_variants:
            raise StoreError(f"variant {variant} out of range 0..{self.n_variants - 1}")
        self.variant = variant
        self.flip = flip
        self.labels = labels
        # (store position, tap, key, stride) of every feature this dataset yields.
        self.entries: list[tuple[int, str, str, int]] = []
        for i, s in enumerate(stores):
            for tap in s.taps if taps is None else [t for t in s.taps if t in taps]:
                key = feature_key(s.identity.timestep, tap)
                self.entries.append((i, tap, key, s.tap_info[tap]["stride"]))
        if not self.entries:
            raise StoreError(f"no taps selected from {[str(p) for p in self.store_paths]}")
        self.max_stride = max(e[3] for e in self.entries)
        if crop is not None:
            ch, cw = crop
            H, W = self.resolution
            if ch % self.max_stride or cw % self.max_stride or ch > H or cw > W or ch < 1 or cw < 1:
                raise StoreError(
                    f"crop {crop} must be positive multiples of the largest stride "
                    f"{self.max_stride} within the image size {self.resolution}"
                )
        self.crop = crop
        if labels and not (self.encoded_dir / LABELS_NAME).exists():
            raise StoreError(f"{self.encoded_dir / LABELS_NAME}: labels not found (run encode)")
        self._pid: int | None = None
        self._stores: list[FeatureStore] = []
        self._labels: Any = None

    def __len__(self) -> int:
        return len(self.indices)

    def _open(self) -> None:
        # Open per process: handles must not be shared across DataLoader worker forks.
        if self._pid != os.getpid():
            self._stores = [FeatureStore.open(p) for p in self.store_paths]
            self._labels = open_labels(self.encoded_dir) if self.labels else None
            self._pid = os.getpid()

    def _window(self) -> tuple[int, int, int, int]:
        H, W = self.resolution
        if self.crop is None:
            return 0, H, 0, W
        ch, cw = self.crop
        s = self.max_stride
        y0 = int(torch.randint(0, (H - ch) // s + 1, ()).item()) * s
        x0 = int(torch.randint(0, (W - cw) // s + 1, ()).item()) * s
        return y0, y0 + ch, x0, x0 + cw

    def __getitem__(self, item: int) -> dict[str, Any]:
        self._open()
        idx = self.indices[item]
        v = self.variant
        if v is None:
            v = int(torch.randint(0, self.n_variants, ()).item())
        y0, y1, x0, x1 = self._window()
        flip = self.flip and bool(torch.rand(()) < 0.5)
        feats: dict[str, torch.Tensor] = {}
        for si, tap, key, s in self.entries:
            window = (
                None if self.crop is None else (slice(y0 // s, y1 // s), slice(x0 // s, x1 // s))
            )
            x = self._stores[si].read(tap, idx, v, window)
            if flip:
                x = x[..., ::-1]
            feats[key] = torch.from_numpy(np.ascontiguousarray(x))
        sample: dict[str, Any] = {"features": feats, "index": idx}
        if self.labels:
            lab = np.asarray(self._labels[idx, y0:y1, x0:x1])
            if flip:
                lab = lab[:, ::-1]
            sample["label"] = torch.from_numpy(np.ascontiguousarray(lab).astype(np.int64))
        return sample

    def index_frame(self) -> pd.DataFrame:
        """The encode index rows of this dataset's images, in dataset order."""
        return read_index(self.encoded_dir).iloc[self.indices]
