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

from pipeline.core.classes import IGNORE_INDEX, NUM_CLASSES
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.fileio import atomic_path
from pipeline.core.names import plain_name_problem
from pipeline.core.params import STRICT, Resolution
from pipeline.data.images import png_bytes, read_image, read_label, read_label_u16
from pipeline.data.layouts import (
    ACDC_CONDITIONS,
    LAYOUTS,
    convert_label,
    label_table,
    layout_pairs,
)
from pipeline.data.manifest import make_manifest
from pipeline.data.synthetic import DOMAINS, SceneGenerator

# A dataset kind: generated here, or one of the published layouts (data/layouts.py LAYOUTS).
Kind = Literal[("synthetic", *LAYOUTS)]
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


def find_pairs(entry: DatasetEntry, split: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs of `split` in the entry's published layout (at most `limit`)."""
    conditions = ACDC_CONDITIONS if entry.condition == "all" else (entry.condition,)
    pairs = [p for c in conditions for p in layout_pairs(entry.kind, Path(entry.root), split, c)]
    return pairs[: entry.limit] if entry.limit else pairs


def holdout_split(pairs: list[tuple[Path, Path]], fraction: float, where: str) -> tuple[list, list]:
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


def _prepare_synthetic(
    entry: DatasetEntry, name: str, splits: dict[str, int], cfg: SyntheticConfig, final: Path
) -> PreparedDomain:
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
                    rows.append(
                        {
                            "image": str(final / "images" / fname),
                            "label": str(final / "labels" / fname),
                            "domain": name,
                            "split": split,
                            "height": cfg.height,
                            "width": cfg.width,
                            "sha256": hashlib.sha256(img_bytes).hexdigest(),
                            "label_sha256": hashlib.sha256(label_bytes).hexdigest(),
                        }
                    )
                    bar.update()
    return PreparedDomain(name, make_manifest(rows), counts)


def _prepare_real(
    entry: DatasetEntry, name: str, splits: dict[str, list[tuple[Path, Path]]], final: Path
) -> PreparedDomain:
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
                    rows.append(
                        {
                            "image": str(image_path),
                            "label": str(final / "labels" / split / f"{stem}.png"),
                            "domain": name,
                            "split": split,
                            "height": label.shape[0],
                            "width": label.shape[1],
                            "sha256": digest,
                            "label_sha256": hashlib.sha256(label_bytes).hexdigest(),
                        }
                    )
                    bar.update()
    return PreparedDomain(name, make_manifest(rows), counts)


def _common_parent(paths: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def prepare_domain(
    entry: DatasetEntry,
    name: str,
    role: str,
    synthetic: SyntheticConfig,
    out_dir: str | os.PathLike[str] = DATASETS_DIR,
) -> PreparedDomain:
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
