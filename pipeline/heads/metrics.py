"""Segmentation scores over a whole split (the Cityscapes convention), as metrics/evaluate.json's
contract: {"mIoU", "aAcc", "IoU": {class: value | null}} in percent."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.core.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES


def confusion(
    pred: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ignore pixels skipped."""
    pred = torch.as_tensor(pred).reshape(-1).long()
    label = torch.as_tensor(label).reshape(-1).long()
    if pred.shape != label.shape:
        raise ValueError(f"prediction has {pred.numel()} pixels, label {label.numel()}")
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    if label.numel() and (label.max() >= num_classes or label.min() < 0):
        raise ValueError(f"label ids outside 0..{num_classes - 1} and {ignore_index}")
    if pred.numel() and (pred.max() >= num_classes or pred.min() < 0):
        raise ValueError(f"predicted ids outside 0..{num_classes - 1}")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


class ConfusionMeter:
    """Accumulates a confusion matrix over batches of a split."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> None:
        self.matrix += confusion(pred, label, self.num_classes)

    def scores(self, class_names: tuple[str, ...] = CLASSES) -> dict:
        return scores(self.matrix, class_names)


def scores(matrix: np.ndarray, class_names: tuple[str, ...] = CLASSES) -> dict:
    """{"mIoU", "aAcc", "IoU": {class: % or None}}; classes absent from GT and prediction are None."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {m.shape} does not match {len(class_names)} classes")
    tp = np.diag(m)
    gt = m.sum(axis=1)
    pr = m.sum(axis=0)
    union = gt + pr - tp
    raw = [100.0 * tp[i] / union[i] if union[i] > 0 else None for i in range(len(class_names))]
    present = [v for v in raw if v is not None]
    total = m.sum()
    iou = {
        n: (round(float(v), 4) if v is not None else None)
        for n, v in zip(class_names, raw, strict=True)
    }
    return {
        "mIoU": round(float(np.mean(present)), 4) if present else None,
        "aAcc": round(float(100.0 * tp.sum() / total), 4) if total > 0 else None,
        "IoU": iou,
    }
