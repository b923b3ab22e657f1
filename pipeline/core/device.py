"""Where torch runs: the device a stage uses and its CPU thread count."""

from __future__ import annotations

import resource
import sys

import torch


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
