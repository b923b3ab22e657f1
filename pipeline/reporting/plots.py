"""Figures and `dvc plots` CSVs of every stage: class frequencies, curves, IoU, overlays."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: stages run under DVC without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.core.classes import CLASSES, NUM_CLASSES, PALETTE, colorize  # noqa: E402
from pipeline.core.fileio import atomic_path  # noqa: E402


def iou_rows(scores: dict[str, dict]) -> list[dict]:
    """Long format {"domain", "class", "IoU"} from {domain: contract scores}; absent classes skipped."""
    return [
        {"domain": d, "class": c, "IoU": v}
        for d, s in scores.items()
        for c, v in s["IoU"].items()
        if v is not None
    ]


def _save(fig: plt.Figure, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def iou_bars(scores: dict[str, dict], path: str | os.PathLike[str]) -> None:
    """Grouped bar chart: IoU per class, one bar per domain."""
    domains = list(scores)
    x = np.arange(len(CLASSES))
    width = 0.8 / max(len(domains), 1)
    fig, ax = plt.subplots(figsize=(14, 4.5))
    for i, d in enumerate(domains):
        vals = [np.nan if v is None else v for v in scores[d]["IoU"].values()]
        ax.bar(x + i * width, vals, width, label=f"{d} (mIoU {scores[d]['mIoU'] or 0:.1f})")
    ax.set_xticks(x + 0.4 - width / 2, CLASSES, rotation=45, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncols=min(len(domains), 5))
    ax.set_title("Per-class IoU per domain")
    _save(fig, path)


def confusion_png(matrix: np.ndarray, path: str | os.PathLike[str], title: str) -> None:
    """Row-normalized confusion matrix (rows = ground truth)."""
    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ticks = np.arange(len(CLASSES))
    ax.set_xticks(ticks, CLASSES, rotation=90, fontsize=7)
    ax.set_yticks(ticks, CLASSES, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


def overlay_grid(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    path: str | os.PathLike[str],
    title: str = "",
) -> None:
    """One row per image: image | ground truth | prediction, in Cityscapes colors."""
    n = len(images)
    if n == 0:
        raise ValueError(f"{path}: no images for the overlay grid")
    h, w = labels[0].shape
    fig, axes = plt.subplots(n, 3, figsize=(9, 9 * h / w / 3 * n + 0.6), squeeze=False)
    for r, (img, lab, pred) in enumerate(zip(images, labels, preds, strict=True)):
        for c, (panel, name) in enumerate(
            ((img, "image"), (colorize(lab), "ground truth"), (colorize(pred), "prediction"))
        ):
            axes[r, c].imshow(panel)
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(name)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def curve_png(curve: Sequence[dict], val: Sequence[dict], path: str | os.PathLike[str]) -> None:
    """Training loss and source-val mIoU against iterations."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in curve], [r["loss"] for r in curve], label="train loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy")
    if val:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in val], [r["mIoU"] for r in val], "o-", color="C1")
        ax2.set_ylabel("source val mIoU (%)", color="C1")
    ax.set_title("Training curve")
    _save(fig, path)


def plot_class_frequencies(counts: dict[str, np.ndarray], path: str | os.PathLike[str]) -> None:
    """Grouped bars (log scale) of class pixel shares, one group per class, one bar per domain.

    counts: per domain, pixel counts of the 19 classes (+ ignore).
    """
    domains = list(counts)
    fig, ax = plt.subplots(figsize=(12, 4.5), dpi=100)
    width = 0.8 / max(len(domains), 1)
    x = np.arange(NUM_CLASSES)
    for k, domain in enumerate(domains):
        labeled = np.asarray(counts[domain][:NUM_CLASSES], dtype=np.float64)
        share = np.maximum(labeled / max(labeled.sum(), 1.0) * 100, 1e-4)
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
