"""The published dataset layouts: where a split's images and labels are, and how label ids
become the 19 Cityscapes train ids. `LAYOUTS` declares each kind once; params' `data.*.kind`
and prepare's file search come from it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.core.classes import IGNORE_INDEX, LABEL_ID_TO_TRAIN_ID, NUM_CLASSES
from pipeline.core.errors import DataError

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


@dataclasses.dataclass(frozen=True)
class LabelTable:
    """id -> train id lookup, which ids the dataset defines, and how its label files are stored."""

    lut: np.ndarray  # uint8, 256 or 65536 entries
    valid: np.ndarray  # bool, same size
    sixteen_bit: bool = False  # Synthia: 16-bit PNG, class id in the first channel


def _cityscapes_table() -> LabelTable:
    valid = np.zeros(256, dtype=bool)
    valid[:34] = True  # cityscapesscripts ids 0..33 (license plate -1 never appears in a PNG)
    return LabelTable(LABEL_ID_TO_TRAIN_ID.copy(), valid)


def _train_id_table() -> LabelTable:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[:NUM_CLASSES] = np.arange(NUM_CLASSES)
    valid = np.zeros(256, dtype=bool)
    valid[:NUM_CLASSES] = True
    valid[IGNORE_INDEX] = True
    return LabelTable(lut, valid)


# Mapillary Vistas v1.2 (66 classes, ids 0..65) -> the 19 Cityscapes classes, following the
# Cityscapes definitions used by the domain-generalization literature; everything else ignored
# (parking, rail track, guard rail, bridge, tunnel, caravan and trailer are void in Cityscapes too).
MAPILLARY_TO_TRAIN_ID: dict[int, int] = {
    13: 0,
    7: 0,
    14: 0,
    8: 0,
    23: 0,
    24: 0,  # road, bike lane, service lane, crosswalks, markings
    15: 1,
    2: 1,
    9: 1,
    11: 1,  # sidewalk, curb, curb cut, pedestrian area
    17: 2,  # building
    6: 3,  # wall
    3: 4,  # fence
    45: 5,
    47: 5,
    46: 5,
    44: 5,  # pole, utility pole, sign frame, street light
    48: 6,  # traffic light
    50: 7,  # traffic sign (front)
    30: 8,  # vegetation
    29: 9,
    26: 9,  # terrain, sand
    27: 10,  # sky
    19: 11,  # person
    20: 12,
    21: 12,
    22: 12,  # bicyclist, motorcyclist, other rider
    55: 13,  # car
    61: 14,  # truck
    54: 15,  # bus
    58: 16,  # on rails
    57: 17,  # motorcycle
    52: 18,  # bicycle
}


def _mapillary_table() -> LabelTable:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in MAPILLARY_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    valid = np.zeros(256, dtype=bool)
    valid[:66] = True
    return LabelTable(lut, valid)


# SYNTHIA class id -> Cityscapes train id; SYNTHIA has no terrain, truck or train, so its
# labels never hold those train ids (scores on a Cityscapes-style target stay the 19 classes).
SYNTHIA_TO_TRAIN_ID: dict[int, int] = {
    3: 0,
    4: 1,
    2: 2,
    21: 3,
    5: 4,
    7: 5,
    15: 6,
    9: 7,
    6: 8,
    1: 10,
    10: 11,
    17: 12,
    8: 13,
    19: 15,
    12: 17,
    11: 18,
}


def _synthia_table() -> LabelTable:
    lut = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in SYNTHIA_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    valid = np.zeros(65536, dtype=bool)
    valid[:23] = True  # SYNTHIA ids 0 (void) .. 22 (lane marking)
    return LabelTable(lut, valid, sixteen_bit=True)


def convert_label(ids: np.ndarray, table: LabelTable, path: str | os.PathLike[str]) -> np.ndarray:
    """Map label ids to train ids; an id outside the dataset's table is a DataError."""
    bad = ~table.valid[ids]
    if bad.any():
        unknown = sorted(int(v) for v in np.unique(ids[bad]))[:10]
        raise DataError(f"{path}: label ids {unknown} are not in the dataset's label table")
    return table.lut[ids]


# ---- finding pairs in the published layouts ----


def _inside(path: Path, root: Path, what: str) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise DataError(f"{path}: {what} path leaves the dataset root {root}")
    return resolved


def _pairs(
    root: Path, image_dir: str, label_dir: str, image_suffix: str, label_suffix: str
) -> list[tuple[Path, Path]]:
    """(image, label) pairs: every `*image_suffix` under image_dir, its label mirrored in label_dir."""
    real_root = root.resolve()
    img_base, lab_base = root / image_dir, root / label_dir
    _inside(img_base, real_root, "image folder")
    _inside(lab_base, real_root, "label folder")
    if not img_base.is_dir():
        raise DataError(f"{img_base}: image folder not found")
    images = sorted(p for p in img_base.rglob(f"*{image_suffix}") if not p.name.startswith("."))
    if not images:
        raise DataError(f"{img_base}: no images (*{image_suffix}): empty dataset or split")
    pairs = []
    for image in images:
        _inside(image, real_root, "image")
        rel = image.relative_to(img_base)
        label = lab_base / rel.parent / (rel.name[: -len(image_suffix)] + label_suffix)
        _inside(label, real_root, "label")
        if not label.is_file():
            raise DataError(f"{image}: label not found (expected {label})")
        pairs.append((image, label))
    return pairs


@dataclasses.dataclass(frozen=True)
class Layout:
    """One published layout: image and label folders (with `{split}` and, for ACDC,
    `{condition}`), the file suffixes that pair them, and the label ids' table."""

    images: str
    labels: str
    image_suffix: str
    label_suffix: str
    table: Callable[[], LabelTable]


# Every real dataset kind (`data.*.kind`): the one place a layout is declared.
LAYOUTS: dict[str, Layout] = {
    "gta5": Layout("images", "labels", ".png", ".png", _cityscapes_table),
    "cityscapes": Layout(
        "leftImg8bit/{split}",
        "gtFine/{split}",
        "_leftImg8bit.png",
        "_gtFine_labelIds.png",
        _cityscapes_table,
    ),
    # condition "all": the four together, as DIFF scores ACDC val (datasets.find_pairs)
    "acdc": Layout(
        "rgb_anon/{condition}/{split}",
        "gt/{condition}/{split}",
        "_rgb_anon.png",
        "_gt_labelTrainIds.png",
        _train_id_table,
    ),
    "darkzurich": Layout(
        "rgb_anon/{split}/night",
        "gt/{split}/night",
        "_rgb_anon.png",
        "_gt_labelTrainIds.png",
        _train_id_table,
    ),
    "bdd100k": Layout(
        "images/10k/{split}", "labels/sem_seg/masks/{split}", ".jpg", ".png", _train_id_table
    ),
    "mapillary": Layout("{split}/images", "{split}/v1.2/labels", ".jpg", ".png", _mapillary_table),
    "synthia": Layout("RGB", "GT/LABELS", ".png", ".png", _synthia_table),
}


def label_table(kind: str) -> LabelTable:
    """The label table of a real dataset kind."""
    if kind not in LAYOUTS:
        raise DataError(f"no label table for dataset kind {kind!r}")
    return LAYOUTS[kind].table()


def layout_pairs(
    kind: str, root: Path, split: str, condition: str | None = None
) -> list[tuple[Path, Path]]:
    """(image, label) pairs of `split` (and an ACDC condition) under `root` in kind's layout."""
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found ({kind})")
    if kind not in LAYOUTS:
        raise DataError(f"{root}: dataset kind {kind!r} has no file layout")
    layout = LAYOUTS[kind]
    where = {"split": split, "condition": condition}
    return _pairs(
        root,
        layout.images.format(**where),
        layout.labels.format(**where),
        layout.image_suffix,
        layout.label_suffix,
    )
