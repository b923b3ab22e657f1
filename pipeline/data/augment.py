"""Photometric distortion of an image, as mmseg's PhotoMetricDistortion (DIFF's GTA pipeline).

Seeded by the caller, so each cached draw of an image is reproducible. mmseg applies each step
with probability 0.5: brightness (delta 32), contrast (0.5-1.5) first or last, saturation
(0.5-1.5) and hue (delta 18: numpy's randint(-18, 18), so -18..17) in HSV (DIFF: mmseg/datasets/pipelines/transforms.py:779-884).
"""

from __future__ import annotations

import cv2
import numpy as np


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 RGB, distorted as mmseg does (its BGR/HSV steps on RGB: the same maps)."""
    img = image
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))  # mmseg: mode == 1 -> contrast first
    if contrast_first and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rng.integers(-18, 18)) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(0.5, 1.5))
    return img
