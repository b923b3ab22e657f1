"""Where torch runs: the device a stage uses and its CPU thread count."""

from __future__ import annotations

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
