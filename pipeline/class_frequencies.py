"""Per-domain class pixel frequencies: the numbers and the plot written by `prepare`."""

from __future__ import annotations

import os

import numpy as np

from pipeline.classes import CLASSES, NUM_CLASSES, PALETTE
from pipeline.fileio import atomic_path


def frequencies(counts: np.ndarray) -> np.ndarray:
    """Share of labeled pixels per class (19 values) from counts of 19 classes (+ ignore)."""
    labeled = np.asarray(counts[:NUM_CLASSES], dtype=np.float64)
    return labeled / max(labeled.sum(), 1.0)


def plot_class_frequencies(counts: dict[str, np.ndarray], path: str | os.PathLike[str]) -> None:
    """Grouped bars (log scale) of class pixel shares, one group per class, one bar per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(counts)
    fig, ax = plt.subplots(figsize=(12, 4.5), dpi=100)
    width = 0.8 / max(len(domains), 1)
    x = np.arange(NUM_CLASSES)
    for k, domain in enumerate(domains):
        share = np.maximum(frequencies(counts[domain]) * 100, 1e-4)
        ax.bar(x + (k - (len(domains) - 1) / 2) * width, share, width, label=domain)
    ax.set_yscale("log")
    ax.set_xticks(x, CLASSES, rotation=45, ha="right")
    for tick, color in zip(ax.get_xticklabels(), PALETTE, strict=True):
        tick.set_color(np.minimum(color / 255.0, 0.8))
    ax.set_ylabel("pixels (%)")
    ax.set_title("Class pixel frequencies per domain")
    ax.legend(ncol=min(len(domains), 6), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
