"""The pipeline deletes only what it wrote, and no input is silently mangled: the cases of a new
user's audit (a target's name or root, foreign folders where outputs go, dotted file names,
16-bit images, an incomplete cache that `verify` must not pass)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import PARAMS, config, extract, make_encoded, shard_mb, store_model
from PIL import Image

from pipeline.cache.store import FeatureStore
from pipeline.cache.verify import verify
from pipeline.core.errors import ConfigError, OutputError
from pipeline.core.fileio import MARKER, atomic_path, remove_written, written_here
from pipeline.data.datasets import DatasetEntry, SyntheticConfig, prepare_domain
from pipeline.data.images import read_image
from pipeline.loops import extract as extract_loop
from pipeline.loops.extract import ExtractConfig

SYN = SyntheticConfig(height=32, width=64, seed=0)


def _keep(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("three years of work")
    return {"thesis.tex": (folder / "thesis.tex").read_bytes()}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_an_output_path_holding_a_foreign_folder_is_refused_before_the_work(tmp_path: Path):
    """atomic_path replaces only a folder holding its marker: a user's folder at the
    destination is one OutputError, before anything is written, and stays as it was."""
    dest = tmp_path / "keep"
    kept = _keep(dest)
    with pytest.raises(OutputError, match=rf"{dest}: not written by this pipeline \(no "):
        with atomic_path(dest) as tmp:
            raise AssertionError(f"the work began: {tmp}")
    assert _files(dest) == kept and sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    # What the pipeline wrote it replaces, marker and all.
    out = tmp_path / "ours"
    for text in ("first", "second"):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "a.txt").write_text(text)
        assert (out / "a.txt").read_text() == text and (out / MARKER).is_file()
    assert written_here(out / "deeper") and not written_here(tmp_path)


def test_a_synthetic_root_outside_prepare_s_folder_is_refused(tmp_path: Path, monkeypatch):
    """Case 1: `root: /some/dir` once had prepare replace /some/dir/<target> (exit 0)."""
    from prepare import main  # stages/prepare.py

    kept = _keep(tmp_path / "some" / "keep")
    data = yaml.safe_load(yaml.safe_dump(PARAMS["data"]))
    data["targets"] = {
        "keep": {**data["targets"]["fog"], "root": str(tmp_path / "some"), "count": 2}
    }
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**PARAMS, "data": data}))
    outs = [tmp_path / "datasets", tmp_path / "manifests", tmp_path / "freq.png"]
    monkeypatch.setattr(sys, "argv", ["prepare.py", *map(str, outs), "--params", str(params)])
    with pytest.raises(ConfigError, match=r"data.targets.keep.root .*some: a synthetic dataset"):
        main()
    assert _files(tmp_path / "some" / "keep") == kept
    assert not any(p.exists() for p in outs)


def test_prepare_never_replaces_a_folder_it_did_not_write(tmp_path: Path):
    """Even inside its own output folder: a user's folder where a domain goes is refused."""
    root = tmp_path / "datasets" / "synthetic"
    kept = _keep(root / "fog")
    entry = DatasetEntry(kind="synthetic", root=str(root), split="val", domain="fog", count=2)
    with pytest.raises(OutputError, match=r"synthetic/fog: not written by this pipeline"):
        prepare_domain(entry, "fog", "target", SYN, tmp_path / "datasets")
    assert _files(root / "fog") == kept
    shutil.rmtree(root / "fog")
    first = prepare_domain(entry, "fog", "target", SYN, tmp_path / "datasets")
    again = prepare_domain(entry, "fog", "target", SYN, tmp_path / "datasets")  # its own: replaced
    assert list(first.frame["sha256"]) == list(again.frame["sha256"])


def test_extract_replaces_stale_stores_but_never_a_foreign_folder(tmp_path: Path):
    model = store_model(tmp_path / "model")
    make_encoded(tmp_path / "encoded", model, 4)
    cfg = config("extract", ExtractConfig, batch_size=2, shard_mb=shard_mb(2, model))
    out = tmp_path / "features" / "t50"
    extract(model, tmp_path / "encoded", 50, out / "game", cfg)
    kept = _keep(out / "notes")
    (out / "notes" / "zarr.json").write_text("{}")  # looks like Zarr, is not ours
    with pytest.raises(OutputError, match=r"t50/notes: not written by this pipeline"):
        extract_loop.remove_stale(out / "notes", FeatureStore.open(out / "game").identity)
    assert kept.items() <= _files(out / "notes").items()
    # A store of ours with other settings goes (DVC's cache keeps it); so does a damaged one.
    other = FeatureStore.open(out / "game").identity
    shutil.copytree(out / "game", out / "old")
    (out / "old" / "zarr.json").write_text("garbage")  # root metadata gone: done/ still says
    assert extract_loop.remove_stale(out / "old", other) and not (out / "old").exists()


def test_remove_written_refuses_foreign_folders_but_not_files_or_empty_ones(tmp_path: Path):
    kept = _keep(tmp_path / "theirs")
    with pytest.raises(OutputError, match="1 entries: thesis.tex"):
        remove_written(tmp_path / "theirs")
    assert _files(tmp_path / "theirs") == kept
    (tmp_path / "empty").mkdir()
    remove_written(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_dotted_image_names_keep_distinct_labels(tmp_path: Path):
    """Case 5: frame.001.png and frame.002.png once wrote one label file (`split(".")[0]`)."""
    root = tmp_path / "gta5"
    rng = np.random.default_rng(0)
    for name, value in (("frame.001.png", 1), ("frame.002.png", 2)):
        for sub, array in (
            ("images", rng.integers(0, 255, (8, 16, 3), dtype=np.uint8)),
            ("labels", np.full((8, 16), 6 + value, np.uint8)),  # road, sidewalk ids
        ):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / sub / name)
    entry = DatasetEntry(kind="gta5", root=str(root), split="all")
    frame = prepare_domain(entry, "gta5", "target", SYN, tmp_path / "out").frame
    labels = [Path(p).name for p in frame["label"]]
    assert labels == ["frame.001.png", "frame.002.png"]
    assert [int(np.asarray(Image.open(p)).max()) for p in frame["label"]] == [0, 1]


def test_16_bit_gray_images_are_scaled_not_clipped(tmp_path: Path):
    """Case 6: Pillow's convert("RGB") turned 99.7 % of a 16-bit image white."""
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = read_image(tmp_path / "g16.png")
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert (rgb == 255).mean() < 0.01
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(Exception, match=r"f.tiff: unsupported image mode F"):
        read_image(tmp_path / "f.tiff")


def test_verify_reports_an_incomplete_store_and_missing_stores(tmp_path: Path, capsys):
    """Case 7: after `kill -9` in extract, verify printed "0 bad files" and exited 0."""
    model = store_model(tmp_path / "model")
    make_encoded(tmp_path / "data/encoded", model, 6)
    cfg = config("extract", ExtractConfig, batch_size=2, shard_mb=shard_mb(2, model))
    features = tmp_path / "data/features"
    extract(model, tmp_path / "data/encoded", 50, features / "t50" / "game", cfg)
    store = FeatureStore.open(features / "t50" / "game", mode="r+")
    store.set_done(1, 0)  # as a kill before shard 1's flag
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**PARAMS, "timesteps": [50, 150]}))
    n = verify([features], encoded=tmp_path / "data/encoded", params=params)
    printed = capsys.readouterr().out
    assert n == 3, printed
    assert f"{features}/t50/game: incomplete: 1 of 2 shards not written" in printed
    assert f"{features}/t50/real: missing: no store of this encoded set" in printed
    assert f"{features}/t150: missing: no store of this timestep of params.yaml" in printed
    assert verify([features], delete=True, encoded=tmp_path / "data/encoded", params=params) == 3
    assert (features / "t50" / "game").is_dir()  # nothing deleted for what is unfinished
