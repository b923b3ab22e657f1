"""A split in memory when it fits the loader's budget, else streamed from the store.

Preloading reads through the reader's own per-sample path (whole chunks read directly, see
cache/shards.py); features stay in stored precision (float16) in memory. Streaming reads each
sample when a batch needs it, in DataLoader workers with reader threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import Tensor
from tqdm import tqdm

from pipeline.core.params import STRICT, Positive
from pipeline.data.samples import Reader, nbytes, stacked_views


@dataclass(config=STRICT)
class LoaderConfig:
    """The `loader` group: how train and evaluate read the stores."""

    memory_budget_mb: Annotated[int, Field(ge=0)]  # preload a split only if it fits; 0: stream
    read_threads: Positive  # per reading process, over a sample's taps and timesteps
    workers: Annotated[int, Field(ge=0)]  # DataLoader worker processes (0: in the loop's own)
    prefetch: Positive  # batches each worker reads ahead


def sample_bytes(reader: Reader, row: int) -> int:
    """Bytes of one row's features under one variant, and its label."""
    return sum(map(nbytes, [*reader.features(row, 0).values(), reader.label(row, 0)]))


class MemoryReader:
    """A reader's features of some rows under some variants, and their labels, in memory."""

    def __init__(
        self, reader: Reader, rows: Sequence[int], variants: Sequence[int], progress: bool = True
    ) -> None:
        self.n_rows, self.draws = reader.n_rows, reader.draws
        self.variants = list(dict.fromkeys(int(v) for v in variants))
        self._features: dict[tuple[int, int], dict[str, Tensor]] = {}
        self._labels: dict[tuple[int, int], Tensor] = {}
        draws = sorted({v % self.draws for v in self.variants})
        for row in tqdm([int(r) for r in rows], desc="preload", disable=not progress):
            for v in self.variants:
                self._features[row, v] = reader.features(row, v)
            for d in draws:
                self._labels[row, d] = reader.label(row, d)

    def features(self, row: int, variant: int = 0) -> dict[str, Tensor]:
        return self._features[row, variant]

    def views(self, row: int, variants: Sequence[int]) -> dict[str, Tensor]:
        return stacked_views(self, row, variants)

    def label(self, row: int, draw: int = 0) -> Tensor:
        return self._labels[row, draw]


def within_budget(
    reader: Reader, rows: Sequence[int], variants: Sequence[int], cfg: LoaderConfig, what: str
) -> Reader:
    """`reader`'s rows and variants preloaded when they fit `cfg.memory_budget_mb`, else the
    reader itself (streamed); the choice is printed."""
    variants = list(dict.fromkeys(variants))
    need = len(rows) * len(variants) * sample_bytes(reader, rows[0]) / 2**20 if rows else 0.0
    if need <= cfg.memory_budget_mb:
        print(
            f"{what}: preloading {len(rows)} samples x {len(variants)} variants ({need:.0f} MiB "
            f"<= loader.memory_budget_mb {cfg.memory_budget_mb})",
            flush=True,
        )
        return MemoryReader(reader, rows, variants)
    print(
        f"{what}: streaming {len(rows)} samples from the store ({need:.0f} MiB > "
        f"loader.memory_budget_mb {cfg.memory_budget_mb})",
        flush=True,
    )
    return reader
