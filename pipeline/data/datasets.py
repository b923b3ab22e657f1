"""Dataset adapters: find (image, label) pairs in each published layout, convert labels to train ids.

Each dataset entry of params.yaml (`data.source`, `data.targets.<domain>`) becomes one prepared
domain: label maps converted once to single-channel train-id PNGs (255 = ignore) at their original
size (evaluation scores there), and manifest rows. Every problem raises one DataError naming the
file. Images are resized later, by encode, to each entry's `resolution`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass
from tqdm import tqdm

from pipeline.core.classes import IGNORE_INDEX, LABEL_ID_TO_TRAIN_ID, NUM_CLASSES
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.fileio import atomic_path
from pipeline.core.names import plain_name_problem
from pipeline.core.params import STRICT, Resolution
from pipeline.data.images import png_bytes, read_image, read_label, read_label_u16
from pipeline.data.manifest import make_manifest
from pipeline.data.synthetic import DOMAINS, SceneGenerator

Kind = Literal["synthetic", "gta5", "cityscapes", "acdc", "darkzurich", "bdd100k", "mapillary",
               "synthia"]
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
Positive = Annotated[int, Field(ge=1)]


@dataclass(config=STRICT)
class DatasetEntry:
    """One dataset of params.yaml `data`; keys a kind does not use stay unset (None)."""

    kind: Kind
    root: str
    split: str  # the folder split it reads (a target is scored as split "val" whatever it is)
    domain: str | None = None  # synthetic: the appearance domain (game, real, fog, ...)
    condition: str | None = None  # acdc: fog | night | rain | snow
    count: Positive | None = None  # synthetic: images of `split`
    val_count: Positive | None = None  # synthetic source: validation images
    val_split: str | None = None  # real source with a published val split (cityscapes: val)
    # real source: held-out share; 0: train on every image (DIFF trains on all of GTA and
    # validates on Cityscapes val), then the source has no val split to score
    val_fraction: Annotated[float, Field(ge=0, lt=1)] | None = None
    # [H, W] the images are encoded at (aspect kept, padded): DIFF feeds GTA at 1280 wide and
    # Cityscapes at 1024x512; None: encode.resolution.
    resolution: Resolution | None = None
    limit: Positive | None = None  # at most this many images per split (first in sorted order)

    @model_validator(mode="after")
    def _kind_keys(self) -> DatasetEntry:
        if self.kind == "synthetic" and self.domain not in DOMAINS:
            raise ValueError(f"a synthetic entry needs domain in {DOMAINS}")
        if self.kind != "synthetic" and (self.count or self.val_count):
            raise ValueError("count and val_count are for synthetic entries")
        if self.kind == "acdc" and self.condition not in (*ACDC_CONDITIONS, "all"):
            raise ValueError(f"an acdc entry needs condition in {ACDC_CONDITIONS} or all")
        return self


@dataclass(config=STRICT)
class SyntheticConfig:
    """Resolution and seed of the generated benchmark."""

    height: Positive
    width: Positive
    seed: int


@dataclass(config=STRICT)
class DataConfig:
    """The `data` group: a source (train + val) and target domains (val), by name."""

    source: DatasetEntry
    targets: dict[str, DatasetEntry]
    synthetic: SyntheticConfig

    @property
    def source_name(self) -> str:
        """The source domain's name: its synthetic domain, or the dataset kind."""
        return self.source.domain if self.source.kind == "synthetic" else self.source.kind

    def resolutions(self, default: list[int]) -> dict[str, list[int]]:
        """{domain name: [H, W] its images are encoded at}."""
        entries = {self.source_name: self.source, **self.targets}
        return {name: list(e.resolution or default) for name, e in entries.items()}

    @model_validator(mode="after")
    def _roles(self) -> DataConfig:
        src = self.source
        for name in self.targets:
            problem = plain_name_problem(name)
            if problem:
                raise ValueError(f"target name {problem}")
        if self.source_name in self.targets:
            raise ValueError(f"target {self.source_name!r} has the source domain's name")
        if src.kind == "synthetic" and not (src.count and src.val_count):
            raise ValueError("a synthetic source needs count (train) and val_count (val)")
        if src.kind != "synthetic" and src.val_split is None and src.val_fraction is None:
            raise ValueError(
                "a real source needs val_split (its published val split, e.g. cityscapes: val) "
                "or val_fraction (a held-out share, e.g. 0.05 for gta5)"
            )
        for name, entry in self.targets.items():
            if entry.kind == "synthetic" and not entry.count:
                raise ValueError(f"synthetic target {name!r} needs count")
        return self


# prepare's output folder (dvc.yaml): check_params checks destinations against it.
DATASETS_DIR = "data/datasets"


def destination(entry: DatasetEntry, name: str, datasets_dir: str | os.PathLike[str]) -> Path:
    """The folder prepare writes (and replaces) for a domain: generated images under the
    synthetic entry's root, converted labels of a real dataset under `datasets_dir`."""
    return Path(entry.root if entry.kind == "synthetic" else datasets_dir) / name


def destinations(cfg: DataConfig, datasets_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """{domain: its destination}, the source's first."""
    entries = {cfg.source_name: cfg.source, **cfg.targets}
    return {name: destination(e, name, datasets_dir) for name, e in entries.items()}


def check_destinations(cfg: DataConfig, datasets_dir: str | os.PathLike[str]) -> None:
    """Every folder prepare replaces lies inside its own output folder `datasets_dir`, and no two
    overlap: a synthetic root elsewhere would have prepare replace `<root>/<name>`."""
    owned = Path(datasets_dir).resolve()
    dests = {name: d.resolve() for name, d in destinations(cfg, datasets_dir).items()}
    outside = [
        f"data.{'source' if name == cfg.source_name else 'targets.' + name}.root {d.parent}"
        for name, d in dests.items()
        if not d.is_relative_to(owned)
    ]
    if outside:
        raise ConfigError(
            f"{', '.join(outside)}: a synthetic dataset is generated inside prepare's output "
            f"folder {datasets_dir}, which it replaces; set root to {datasets_dir}/synthetic"
        )
    for a, da in dests.items():
        for b, db in dests.items():
            if a != b and da.is_relative_to(db):
                raise ConfigError(
                    f"data: domains {a!r} and {b!r} would be written to {da} inside {db}, "
                    "which prepare replaces; give the synthetic entry another root"
                )


@dataclasses.dataclass
class PreparedDomain:
    """A domain ready to be written: manifest rows and per-class pixel counts (19 + ignore)."""

    domain: str
    frame: pd.DataFrame
    class_counts: np.ndarray


# ---- label tables ----


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
    13: 0, 7: 0, 14: 0, 8: 0, 23: 0, 24: 0,  # road, bike lane, service lane, crosswalks, markings
    15: 1, 2: 1, 9: 1, 11: 1,  # sidewalk, curb, curb cut, pedestrian area
    17: 2,  # building
    6: 3,  # wall
    3: 4,  # fence
    45: 5, 47: 5, 46: 5, 44: 5,  # pole, utility pole, sign frame, street light
    48: 6,  # traffic light
    50: 7,  # traffic sign (front)
    30: 8,  # vegetation
    29: 9, 26: 9,  # terrain, sand
    27: 10,  # sky
    19: 11,  # person
    20: 12, 21: 12, 22: 12,  # bicyclist, motorcyclist, other rider
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


# SYNTHIA class id -> Cityscapes train id; the 16-class protocol drops terrain, truck and train
# (Synthia has none of them), so those ids map to ignore.
SYNTHIA_TO_TRAIN_ID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10,
    10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18,
}
SYNTHIA_16_CLASSES = tuple(sorted(SYNTHIA_TO_TRAIN_ID.values()))


def _synthia_table() -> LabelTable:
    lut = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in SYNTHIA_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    valid = np.zeros(65536, dtype=bool)
    valid[:23] = True  # SYNTHIA ids 0 (void) .. 22 (lane marking)
    return LabelTable(lut, valid, sixteen_bit=True)


def label_table(kind: str) -> LabelTable:
    """The label table of a real dataset kind."""
    if kind in ("gta5", "cityscapes"):
        return _cityscapes_table()
    if kind in ("acdc", "darkzurich", "bdd100k"):
        return _train_id_table()
    if kind == "mapillary":
        return _mapillary_table()
    if kind == "synthia":
        return _synthia_table()
    raise DataError(f"no label table for dataset kind {kind!r}")


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


def _pairs(root: Path, image_dir: str, label_dir: str, image_suffix: str,
           label_suffix: str) -> list[tuple[Path, Path]]:
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


def find_pairs(entry: DatasetEntry, split: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs of `split` in the entry's published layout."""
    root = Path(entry.root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found ({entry.kind})")
    kind = entry.kind
    if kind == "gta5":
        pairs = _pairs(root, "images", "labels", ".png", ".png")
    elif kind == "cityscapes":
        pairs = _pairs(root, f"leftImg8bit/{split}", f"gtFine/{split}", "_leftImg8bit.png",
                       "_gtFine_labelIds.png")
    elif kind == "acdc":  # condition "all": the four together, as DIFF scores ACDC val
        conditions = ACDC_CONDITIONS if entry.condition == "all" else (entry.condition,)
        pairs = [pair for c in conditions
                 for pair in _pairs(root, f"rgb_anon/{c}/{split}", f"gt/{c}/{split}",
                                    "_rgb_anon.png", "_gt_labelTrainIds.png")]
    elif kind == "darkzurich":
        pairs = _pairs(root, f"rgb_anon/{split}/night", f"gt/{split}/night", "_rgb_anon.png",
                       "_gt_labelTrainIds.png")
    elif kind == "bdd100k":
        pairs = _pairs(root, f"images/10k/{split}", f"labels/sem_seg/masks/{split}", ".jpg", ".png")
    elif kind == "mapillary":
        pairs = _pairs(root, f"{split}/images", f"{split}/v1.2/labels", ".jpg", ".png")
    elif kind == "synthia":
        pairs = _pairs(root, "RGB", "GT/LABELS", ".png", ".png")
    else:
        raise DataError(f"{root}: dataset kind {kind!r} has no file layout")
    return pairs[: entry.limit] if entry.limit else pairs


def holdout_split(pairs: list[tuple[Path, Path]], fraction: float,
                  where: str) -> tuple[list, list]:
    """Deterministic (train, val) split by a hash of each image name (stable as files are added)."""
    ranked = sorted(pairs, key=lambda p: hashlib.sha1(p[0].name.encode()).hexdigest())
    n_val = max(1, round(len(pairs) * fraction))
    if n_val >= len(pairs):
        raise DataError(f"{where}: {len(pairs)} images cannot give both a train and a val split")
    val = set(id(p) for p in ranked[:n_val])
    return [p for p in pairs if id(p) not in val], [p for p in pairs if id(p) in val]


# ---- preparing one domain ----


def _counts(label: np.ndarray) -> np.ndarray:
    counts = np.bincount(label.ravel(), minlength=256)
    return np.concatenate([counts[:NUM_CLASSES], counts[IGNORE_INDEX : IGNORE_INDEX + 1]])


def _prepare_synthetic(entry: DatasetEntry, name: str, splits: dict[str, int],
                       cfg: SyntheticConfig, final: Path) -> PreparedDomain:
    gen = SceneGenerator(cfg.height, cfg.width, cfg.seed)
    rows, counts = [], np.zeros(NUM_CLASSES + 1, dtype=np.int64)
    with atomic_path(final) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "labels").mkdir()
        total = sum(splits.values())
        with tqdm(total=total, desc=f"synthetic {name}", leave=False) as bar:
            for split, count in splits.items():
                for i in range(count):
                    image, label = gen.sample(i, entry.domain, split)
                    fname = f"{split}_{i:05d}.png"
                    img_bytes, label_bytes = png_bytes(image), png_bytes(label)
                    (tmp / "images" / fname).write_bytes(img_bytes)
                    (tmp / "labels" / fname).write_bytes(label_bytes)
                    counts += _counts(label)
                    rows.append({
                        "image": str(final / "images" / fname), "label": str(final / "labels" / fname),
                        "domain": name, "split": split, "height": cfg.height, "width": cfg.width,
                        "sha256": hashlib.sha256(img_bytes).hexdigest(),
                        "label_sha256": hashlib.sha256(label_bytes).hexdigest(),
                    })
                    bar.update()
    return PreparedDomain(name, make_manifest(rows), counts)


def _prepare_real(entry: DatasetEntry, name: str, splits: dict[str, list[tuple[Path, Path]]],
                  final: Path) -> PreparedDomain:
    table = label_table(entry.kind)
    rows, counts = [], np.zeros(NUM_CLASSES + 1, dtype=np.int64)
    with atomic_path(final) as tmp:
        total = sum(len(p) for p in splits.values())
        with tqdm(total=total, desc=f"{entry.kind} {name}", leave=False) as bar:
            for split, pairs in splits.items():
                img_base = _common_parent([p[0] for p in pairs])
                for image_path, label_path in pairs:
                    image = read_image(image_path)
                    ids = (
                        read_label_u16(label_path) if table.sixteen_bit else read_label(label_path)
                    )
                    if ids.shape != image.shape[:2]:
                        raise DataError(
                            f"{label_path}: label size {ids.shape[1]}x{ids.shape[0]} differs from "
                            f"image {image_path} size {image.shape[1]}x{image.shape[0]}"
                        )
                    label = convert_label(ids, table, label_path)
                    # Only the extension goes (every image of a layout has the same one), so
                    # distinct images keep distinct labels: frame.001.png, frame.002.png.
                    stem = image_path.relative_to(img_base).with_suffix("")
                    digest = hashlib.sha256(image_path.read_bytes()).hexdigest()
                    dest = tmp / "labels" / split / f"{stem}.png"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    label_bytes = png_bytes(label)
                    dest.write_bytes(label_bytes)
                    counts += _counts(label)
                    rows.append({
                        "image": str(image_path), "label": str(final / "labels" / split / f"{stem}.png"),
                        "domain": name, "split": split, "height": label.shape[0],
                        "width": label.shape[1], "sha256": digest,
                        "label_sha256": hashlib.sha256(label_bytes).hexdigest(),
                    })
                    bar.update()
    return PreparedDomain(name, make_manifest(rows), counts)


def _common_parent(paths: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def prepare_domain(entry: DatasetEntry, name: str, role: str, synthetic: SyntheticConfig,
                   out_dir: str | os.PathLike[str] = DATASETS_DIR) -> PreparedDomain:
    """Prepare one domain: role "source" gives splits train and val, "target" the entry's split.

    Each goes to its `destination`, written atomically.
    """
    final = destination(entry, name, out_dir)
    if entry.kind == "synthetic":
        if role == "source":
            splits = {"train": entry.count, "val": entry.val_count}
        else:
            splits = {"val": entry.count}
        return _prepare_synthetic(entry, name, splits, synthetic, final)
    if role == "target":  # a target is evaluated: its rows are split "val" whatever its folder
        return _prepare_real(entry, name, {"val": find_pairs(entry, entry.split)}, final)
    train = find_pairs(entry, entry.split)
    if entry.val_split is not None:
        real_splits = {"train": train, "val": find_pairs(entry, entry.val_split)}
    elif entry.val_fraction == 0:
        real_splits = {"train": train}
    else:
        tr, va = holdout_split(train, entry.val_fraction, f"{entry.root} (data.source)")
        real_splits = {"train": tr, "val": va}
    return _prepare_real(entry, name, real_splits, final)
