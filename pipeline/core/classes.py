"""The 19 Cityscapes train classes, their colors, and the label-id to train-id table."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255

CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
NUM_CLASSES = len(CLASSES)

PALETTE = np.array(
    [
        (128, 64, 128),
        (244, 35, 232),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
    ],
    dtype=np.uint8,
)

# Cityscapes label id -> train id, as in cityscapesscripts.helpers.labels (tests check it).
_LABEL_TO_TRAIN = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label_id, _train_id in _LABEL_TO_TRAIN.items():
    LABEL_ID_TO_TRAIN_ID[_label_id] = _train_id


# Train id -> Cityscapes label id (ignore -> 0, "unlabeled"), for exporting predictions.
TRAIN_ID_TO_LABEL_ID = np.zeros(256, dtype=np.uint8)
for _label_id, _train_id in _LABEL_TO_TRAIN.items():
    TRAIN_ID_TO_LABEL_ID[_train_id] = _label_id


def colorize(label: np.ndarray) -> np.ndarray:
    """Map an (H, W) train-id map to (H, W, 3) Cityscapes colors; ignore pixels are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    return lut[label]
