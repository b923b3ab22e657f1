"""Where torch runs: the device a stage uses, its CPU thread count, how batches reach it."""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def set_threads(threads: int) -> None:
    """torch.set_num_threads unless 0 (keep torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20 if sys.platform == "darwin" else 1 << 10)


def peak_rss_children_mb() -> float:
    """The largest peak resident memory of this process's finished children (DataLoader
    workers), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak / (1 << 20 if sys.platform == "darwin" else 1 << 10)


def data_loader(
    dataset: Dataset, device: str, workers: int, prefetch: int, **kwargs: Any
) -> DataLoader:
    """A DataLoader whose batches land in pinned memory on CUDA (so the copy to the GPU, made
    with non_blocking=True, overlaps compute); `workers` processes each read `prefetch`
    batches ahead."""
    return DataLoader(
        dataset,
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=False,
        **kwargs,
    )
