"""Dataset adapters on tiny fixture trees in each published layout, and every bad-input case."""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import PARAMS
from PIL import Image

from pipeline.core.classes import IGNORE_INDEX, LABEL_ID_TO_TRAIN_ID
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.params import validate
from pipeline.data.datasets import (
    DataConfig,
    DatasetEntry,
    SyntheticConfig,
    find_pairs,
    prepare_domain,
)
from pipeline.data.images import read_image, read_label, read_label_u16
from pipeline.data.layouts import SYNTHIA_TO_TRAIN_ID
from pipeline.data.manifest import read_manifest

H, W = 6, 10
SYN = SyntheticConfig(height=32, width=64, seed=0)


def parse_entry(values: dict, where: str) -> DatasetEntry:
    """A dataset entry validated as params.yaml's are."""
    return validate(values, DatasetEntry, where)


RNG = np.random.default_rng(0)


def _png(path: Path, array: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def _image(path: Path, fmt: str = "PNG") -> None:
    _png(path, RNG.integers(0, 255, (H, W, 3), dtype=np.uint8), fmt)


def _png16_rgb(path: Path, first: np.ndarray) -> None:
    """A 16-bit RGB PNG (Synthia's GT/LABELS format) with `first` as its first channel."""
    rgb = np.stack([first, np.full_like(first, 1000), np.zeros_like(first)], -1).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rgb)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", first.shape[1], first.shape[0], 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


CS_IDS = np.array([7, 8, 26, 24, 0, 33, 23, 21, 11, 4], dtype=np.uint8)  # road .. unlabeled
TRAIN_IDS = np.array([0, 1, 13, 11, 255, 18, 10, 8, 2, 255], dtype=np.uint8)


def _ids() -> np.ndarray:
    return np.tile(CS_IDS, (H, 1))


def _train_ids() -> np.ndarray:
    return np.tile(TRAIN_IDS, (H, 1))


def make_tree(kind: str, root: Path, n: int = 2) -> dict:
    """A tiny dataset of `kind` under root; returns the params entry for it."""
    for i in range(n):
        if kind == "gta5":
            _image(root / "images" / f"{i:05d}.png")
            _png(root / "labels" / f"{i:05d}.png", _ids())
        elif kind == "cityscapes":
            for split in ("train", "val"):
                stem = f"aachen_{i:06d}_000019"
                _image(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png")
                _png(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", _ids())
        elif kind == "acdc":
            stem = f"GOPR0475_frame_{i:06d}"
            _image(root / "rgb_anon/fog/val/GOPR0475" / f"{stem}_rgb_anon.png")
            _png(root / "gt/fog/val/GOPR0475" / f"{stem}_gt_labelTrainIds.png", _train_ids())
        elif kind == "darkzurich":
            stem = f"GOPR0356_frame_{i:06d}"
            _image(root / "rgb_anon/val/night/GOPR0356" / f"{stem}_rgb_anon.png")
            _png(root / "gt/val/night/GOPR0356" / f"{stem}_gt_labelTrainIds.png", _train_ids())
        elif kind == "bdd100k":
            _image(root / "images/10k/val" / f"7d{i:05d}.jpg", "JPEG")
            _png(root / "labels/sem_seg/masks/val" / f"7d{i:05d}.png", _train_ids())
        elif kind == "mapillary":
            _image(root / "validation/images" / f"m{i:04d}.jpg", "JPEG")
            ids = np.tile(np.array([13, 15, 55, 19, 65, 52, 27, 30, 17, 25], np.uint8), (H, 1))
            img = Image.fromarray(ids).convert("P")  # v1.2 labels are palette PNGs
            img.putpalette([v for k in range(256) for v in (k, 255 - k, 7)])
            (root / "validation/v1.2/labels").mkdir(parents=True, exist_ok=True)
            img.save(root / "validation/v1.2/labels" / f"m{i:04d}.png")
        elif kind == "synthia":
            _image(root / "RGB" / f"{i:07d}.png")
            _png16_rgb(
                root / "GT/LABELS" / f"{i:07d}.png",
                np.tile(np.array([3, 4, 8, 10, 0, 11, 1, 6, 2, 16], np.uint16), (H, 1)),
            )
    entry = {"kind": kind, "root": str(root), "split": "val"}
    if kind == "acdc":
        entry["condition"] = "fog"
    if kind == "mapillary":
        entry["split"] = "validation"
    return entry


EXPECTED_ROW = {
    "gta5": TRAIN_IDS,
    "cityscapes": TRAIN_IDS,
    "acdc": TRAIN_IDS,
    "darkzurich": TRAIN_IDS,
    "bdd100k": TRAIN_IDS,
    "mapillary": TRAIN_IDS,
    # synthia: its 16 classes to train ids; an id of none of them (16) to ignore
    "synthia": np.array([0, 1, 13, 11, 255, 18, 10, 8, 2, 255], np.uint8),
}


@pytest.mark.parametrize("kind", list(EXPECTED_ROW))
def test_each_layout_gives_a_manifest_with_train_ids(kind, tmp_path):
    entry = parse_entry(make_tree(kind, tmp_path / kind), kind)
    out = tmp_path / "out"
    prep = prepare_domain(entry, f"t_{kind}", "target", SYN, out)
    frame = prep.frame
    assert (
        len(frame) == 2 and set(frame["split"]) == {"val"} and set(frame["domain"]) == {f"t_{kind}"}
    )
    for row in frame.itertuples():
        assert Path(row.image).is_file() and Path(row.label).is_file()
        assert Path(row.label).is_relative_to(out / f"t_{kind}")
        assert (row.height, row.width) == (H, W)
        label = read_label(row.label)
        assert Image.open(row.label).mode == "L"
        np.testing.assert_array_equal(label[0], EXPECTED_ROW[kind])
        assert read_image(row.image).shape == (H, W, 3)
    assert prep.class_counts.sum() == 2 * H * W


def test_source_splits_cityscapes_val_split_and_gta5_holdout(tmp_path):
    cs = parse_entry(
        {**make_tree("cityscapes", tmp_path / "cs", 3), "split": "train", "val_split": "val"}, "cs"
    )
    frame = prepare_domain(cs, "cityscapes", "source", SYN, tmp_path / "o").frame
    assert (frame["split"] == "train").sum() == 3 and (frame["split"] == "val").sum() == 3
    gta = parse_entry({**make_tree("gta5", tmp_path / "gta", 10), "val_fraction": 0.2}, "g")
    first = prepare_domain(gta, "gta5", "source", SYN, tmp_path / "o").frame
    again = prepare_domain(gta, "gta5", "source", SYN, tmp_path / "o2").frame
    assert (first["split"] == "val").sum() == 2 and (first["split"] == "train").sum() == 8
    assert list(first["image"]) == list(again["image"]) and list(first["split"]) == list(
        again["split"]
    )
    data = {
        "source": make_tree("gta5", tmp_path / "g3"),
        "targets": {},
        "synthetic": PARAMS["data"]["synthetic"],
    }
    with pytest.raises(ConfigError, match="data: a real source needs val_split .* or val_fraction"):
        validate(data, DataConfig, "data")


def test_labels_keep_their_original_size_and_images_stay_in_place(tmp_path):
    """Evaluation scores at the original label resolution, so prepare never resizes."""
    entry = parse_entry({**make_tree("gta5", tmp_path / "gta"), "resolution": [64, 128]}, "g")
    frame = prepare_domain(entry, "gta5", "target", SYN, tmp_path / "o").frame
    row = frame.iloc[0]
    assert (row.height, row.width) == (H, W) and read_label(row.label).shape == (H, W)
    assert Path(row.image).is_relative_to(tmp_path / "gta")
    assert row.sha256 == hashlib.sha256(Path(row.image).read_bytes()).hexdigest()


def test_cityscapes_table_matches_cityscapesscripts():
    from cityscapesscripts.helpers.labels import labels

    for lab in labels:
        if lab.id < 0:
            continue
        expected = IGNORE_INDEX if lab.trainId in (255, -1) else lab.trainId
        assert LABEL_ID_TO_TRAIN_ID[lab.id] == expected, lab.name
    assert (LABEL_ID_TO_TRAIN_ID[34:] == IGNORE_INDEX).all()


def test_synthia_reader_takes_the_first_16_bit_channel(tmp_path):
    ids = np.arange(12, dtype=np.uint16).reshape(3, 4) * 300  # values above 255 need 16 bits
    _png16_rgb(tmp_path / "l.png", ids)
    np.testing.assert_array_equal(read_label_u16(tmp_path / "l.png"), ids)
    assert len(SYNTHIA_TO_TRAIN_ID) == 16


# ---- bad input: each one clear DataError naming the file ----


def _target(tmp_path, kind="gta5"):
    return parse_entry(make_tree(kind, tmp_path / kind), kind)


def _prep(entry, tmp_path):
    return prepare_domain(entry, "dom", "target", SYN, tmp_path / "out")


def test_missing_label(tmp_path):
    entry = _target(tmp_path)
    (tmp_path / "gta5/labels/00001.png").unlink()
    with pytest.raises(DataError, match=r"00001\.png: label not found"):
        _prep(entry, tmp_path)
    assert not (tmp_path / "out" / "dom").exists()


def test_label_of_a_different_size(tmp_path):
    entry = _target(tmp_path)
    _png(tmp_path / "gta5/labels/00001.png", np.full((H + 1, W), 7, np.uint8))
    with pytest.raises(DataError, match=r"labels/00001\.png: label size .* differs from image"):
        _prep(entry, tmp_path)


def test_truncated_and_unreadable_images(tmp_path):
    entry = _target(tmp_path)
    path = tmp_path / "gta5/images/00001.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match=r"images/00001\.png: unreadable or truncated"):
        _prep(entry, tmp_path)
    path.write_bytes(b"hello")
    with pytest.raises(DataError, match=r"images/00001\.png: unreadable"):
        _prep(entry, tmp_path)


def test_label_id_outside_the_table(tmp_path):
    entry = _target(tmp_path)
    _png(tmp_path / "gta5/labels/00000.png", np.full((H, W), 40, np.uint8))
    with pytest.raises(DataError, match=r"00000\.png: label ids \[40\] are not in"):
        _prep(entry, tmp_path)
    acdc = _target(tmp_path, "acdc")
    bad = tmp_path / "acdc/gt/fog/val/GOPR0475/GOPR0475_frame_000000_gt_labelTrainIds.png"
    _png(bad, np.full((H, W), 19, np.uint8))
    with pytest.raises(DataError, match=r"labelTrainIds\.png: label ids \[19\]"):
        _prep(acdc, tmp_path)


def test_paths_that_leave_the_root(tmp_path):
    entry = _target(tmp_path)
    outside = tmp_path / "elsewhere.png"
    _image(outside)
    os.symlink(outside, tmp_path / "gta5/images/00009.png")
    _png(tmp_path / "gta5/labels/00009.png", _ids())
    with pytest.raises(DataError, match=r"00009\.png: image path leaves the dataset root"):
        _prep(entry, tmp_path)
    cs = parse_entry({**make_tree("cityscapes", tmp_path / "cs"), "split": "../../x"}, "cs")
    with pytest.raises(DataError, match="leaves the dataset root"):
        _prep(cs, tmp_path)


def test_empty_dataset_split_and_missing_root(tmp_path):
    (tmp_path / "gta5/images").mkdir(parents=True)
    (tmp_path / "gta5/labels").mkdir(parents=True)
    entry = parse_entry({"kind": "gta5", "root": str(tmp_path / "gta5"), "split": "all"}, "g")
    with pytest.raises(DataError, match=r"gta5/images: no images .* empty dataset or split"):
        _prep(entry, tmp_path)
    cs = parse_entry({**make_tree("cityscapes", tmp_path / "cs"), "split": "test"}, "cs")
    with pytest.raises(DataError, match=r"leftImg8bit/test: image folder not found"):
        _prep(cs, tmp_path)
    with pytest.raises(DataError, match="dataset root not found"):
        find_pairs(
            parse_entry({"kind": "gta5", "root": str(tmp_path / "nope"), "split": "all"}, "g"),
            "val",
        )
    with pytest.raises(ConfigError, match=r"s.count: Input should be greater than or equal to 1"):
        parse_entry(
            {
                "kind": "synthetic",
                "domain": "fog",
                "root": str(tmp_path),
                "split": "val",
                "count": 0,
            },
            "s",
        )


def test_bad_entries(tmp_path):
    with pytest.raises(ConfigError, match="t.kind: Input should be 'synthetic', 'gta5'"):
        parse_entry({"kind": "kitti", "root": "x", "split": "val"}, "t")
    with pytest.raises(ConfigError, match="t.colour: unknown key"):
        parse_entry({"kind": "gta5", "root": "x", "split": "all", "colour": 1}, "t")
    with pytest.raises(ConfigError, match="t: an acdc entry needs condition"):
        parse_entry({"kind": "acdc", "root": "x", "split": "val", "condition": "sandstorm"}, "t")
    with pytest.raises(ConfigError, match="t: a synthetic entry needs domain"):
        parse_entry({"kind": "synthetic", "root": "x", "split": "val", "domain": "mars"}, "t")


# ---- the prepare stage end to end ----


def _run_prepare(tmp_path, data: dict, monkeypatch) -> None:
    from prepare import main  # stages/prepare.py

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**PARAMS, "data": data}))
    args = [
        str(tmp_path / "datasets"),
        str(tmp_path / "manifests"),
        str(tmp_path / "plots/class_frequencies.png"),
        "--params",
        str(params),
    ]
    monkeypatch.setattr(sys, "argv", ["prepare.py", *args])
    main()


def test_prepare_stage_writes_manifests_plot_and_is_deterministic(tmp_path, monkeypatch):
    root = str(tmp_path / "datasets/synthetic")
    data = {
        "source": {
            "kind": "synthetic",
            "domain": "game",
            "root": root,
            "split": "train",
            "count": 4,
            "val_count": 2,
        },
        "targets": {
            "fog": {"kind": "synthetic", "domain": "fog", "root": root, "split": "val", "count": 2},
            "cityscapes": make_tree("cityscapes", tmp_path / "cs"),
        },
        "synthetic": {"height": 32, "width": 64, "seed": 1},
    }
    _run_prepare(tmp_path, data, monkeypatch)
    game = read_manifest(tmp_path / "manifests/game.parquet")
    assert list(game["split"]) == ["train"] * 4 + ["val"] * 2
    fog = read_manifest(tmp_path / "manifests/fog.parquet")
    assert set(fog["split"]) == {"val"}
    # same layout, other appearance: game val_00000 and fog val_00000 share the label
    assert read_label(game["label"].iloc[4]).tobytes() == read_label(fog["label"].iloc[0]).tobytes()
    assert game["sha256"].iloc[4] != fog["sha256"].iloc[0]
    assert len(read_manifest(tmp_path / "manifests/cityscapes.parquet")) == 2
    assert (tmp_path / "plots/class_frequencies.png").stat().st_size > 1000
    first = dict(zip(game["image"], game["sha256"], strict=True))
    _run_prepare(tmp_path, data, monkeypatch)
    game2 = read_manifest(tmp_path / "manifests/game.parquet")
    assert dict(zip(game2["image"], game2["sha256"], strict=True)) == first


def test_prepare_failure_leaves_no_manifest(tmp_path, monkeypatch):
    root = str(tmp_path / "datasets/synthetic")
    cs = make_tree("cityscapes", tmp_path / "cs")
    next((tmp_path / "cs/gtFine/val/aachen").glob("*.png")).unlink()
    data = {
        "source": {
            "kind": "synthetic",
            "domain": "game",
            "root": root,
            "split": "train",
            "count": 2,
            "val_count": 1,
        },
        "targets": {"cityscapes": cs},
        "synthetic": {"height": 32, "width": 64, "seed": 0},
    }
    with pytest.raises(DataError, match="label not found"):
        _run_prepare(tmp_path, data, monkeypatch)
    assert not (tmp_path / "manifests").exists()
    assert not list((tmp_path / "datasets").glob("cityscapes*"))
