"""The samples train and evaluate read: one typed record, the reader interface behind it, and the
two datasets over a reader (a split's rows as stored; training views with feature-space crops).

A reader serves one encoded set (cache/reader.py: feature stores; data/pixel_reader.py: pixels;
cache/preload.py: either in memory): `features(row, variant)` and `label(row, draw)`. Variant
v of a store is prompt v // K, draw v % K.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset


class Quantized(NamedTuple):
    """A feature of an int8 store as read: values (..., C, h, w) int8 and per-channel scales
    (..., C) float32. It travels as int8 (a quarter of float32's bytes through workers, pinned
    memory and the copy) and is decoded where the head runs (`to_device`)."""

    values: Tensor
    scales: Tensor

    def map(self, fn: Callable[[Tensor], Tensor]) -> Quantized:
        """`fn` (a crop, a flip) applied to the values; the per-channel scales are unchanged."""
        return Quantized(fn(self.values), self.scales)


Feature = Tensor | Quantized


def stack(xs: Sequence[Feature]) -> Feature:
    """Features stacked along a new first axis (views, or a batch); one alone is a view of
    itself, not a copy (a batch of 1: DIFF's)."""
    if len(xs) == 1:
        x = xs[0]
        return Quantized(x.values[None], x.scales[None]) if isinstance(x, Quantized) else x[None]
    if isinstance(xs[0], Quantized):
        return Quantized(torch.stack([x.values for x in xs]), torch.stack([x.scales for x in xs]))
    return torch.stack(list(xs))


def to_device(features: dict[str, Feature], device: str | torch.device) -> dict[str, Tensor]:
    """Features on `device` as float32; int8 ones are copied as int8 and decoded there (the
    same values as the store's reader decodes: q * scale in float32)."""
    out = {}
    for k, v in features.items():
        if isinstance(v, Quantized):
            scales = v.scales.to(device, non_blocking=True)
            out[k] = v.values.to(device, non_blocking=True).float() * scales[..., None, None]
        else:
            out[k] = v.to(device, torch.float32, non_blocking=True)
    return out


def nbytes(x: Feature) -> int:
    """Bytes a feature (or a label) holds."""
    parts = x if isinstance(x, Quantized) else (x,)
    return sum(t.numel() * t.element_size() for t in parts)


@dataclasses.dataclass
class Sample:
    """One sample, or a batch of them (collate): features {key: (C, h, w)}, views stacked as
    (V, C, h, w); label (H, W) uint8 train ids; index, the row in its set."""

    features: dict[str, Feature]
    label: Tensor
    index: int | Tensor

    def pin_memory(self) -> Sample:
        """Pinned copies, for DataLoader(pin_memory=True): the copy to the GPU overlaps compute."""

        def pin(x: Feature) -> Feature:
            return (
                Quantized(*(t.pin_memory() for t in x))
                if isinstance(x, Quantized)
                else (x.pin_memory())
            )

        return Sample(
            {k: pin(v) for k, v in self.features.items()},
            self.label.pin_memory(),
            self.index.pin_memory() if isinstance(self.index, Tensor) else self.index,
        )


def collate(samples: list[Sample]) -> Sample:
    """Samples stacked into a batch."""
    return Sample(
        {k: stack([s.features[k] for s in samples]) for k in samples[0].features},
        torch.stack([s.label for s in samples]),
        torch.tensor([int(s.index) for s in samples]),
    )


class Reader(Protocol):
    """One encoded set's features and labels, by row."""

    n_rows: int
    draws: int  # K: draws per image

    def features(self, row: int, variant: int) -> dict[str, Feature]: ...

    def views(self, row: int, variants: Sequence[int]) -> dict[str, Feature]: ...

    def label(self, row: int, draw: int = 0) -> Tensor: ...


def stacked_views(reader: Reader, row: int, variants: Sequence[int]) -> dict[str, Feature]:
    """A reader's `views` from its `features`: each variant's, stacked (V, C, h, w)."""
    each = [reader.features(row, v) for v in variants]
    return {k: stack([f[k] for f in each]) for k in each[0]}


class RowsDataset(Dataset):
    """A split's rows of a reader as stored (variant 0: prompt 0, draw 0): what evaluate scores."""

    def __init__(self, reader: Reader, rows: list[int]) -> None:
        self.reader, self.rows = reader, [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Sample:
        row = self.rows[i]
        return Sample(self.reader.features(row, 0), self.reader.label(row, 0), row)


@dataclasses.dataclass(frozen=True)
class Pick:
    """What one training sample reads: a row, its views (store variants of one draw) and, for
    whole frames, a feature-space crop (image pixels, multiples of every stride) and flip."""

    row: int
    draw: int
    variants: tuple[int, ...]
    y0: int = 0
    x0: int = 0
    flip: bool = False


class ViewsDataset(Dataset):
    """Training samples from picks: the views' features stacked (V, C, h, w), cropped and flipped
    with the label; `crop` [h, w] or None (crop draws are read whole)."""

    def __init__(self, reader: Reader, crop: list[int] | None) -> None:
        self.reader, self.crop = reader, crop

    def __len__(self) -> int:
        return self.reader.n_rows

    def __getitem__(self, pick: Pick) -> Sample:
        views = self.reader.views(pick.row, pick.variants)
        label = self.reader.label(pick.row, pick.draw)
        H = label.shape[-2]
        feats = {}
        for key, x in views.items():
            values = x.values if isinstance(x, Quantized) else x
            s = H // values.shape[-2]
            if self.crop:
                y0, x0, (ch, cw) = pick.y0 // s, pick.x0 // s, self.crop
                window = (..., slice(y0, y0 + ch // s), slice(x0, x0 + cw // s))
                x = _apply(x, lambda t, w=window: t[w])
            feats[key] = _apply(x, lambda t: t.flip(-1)) if pick.flip else x
        if self.crop:
            label = label[pick.y0 : pick.y0 + self.crop[0], pick.x0 : pick.x0 + self.crop[1]]
        if pick.flip:
            label = label.flip(-1)
        return Sample(feats, label, pick.row)


def _apply(x: Feature, fn: Callable[[Tensor], Tensor]) -> Feature:
    return x.map(fn) if isinstance(x, Quantized) else fn(x)
