"""Encode: sorted-domain index, latents, nearest-resized labels, prompts; atomic on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import RESOLUTION, config, store_model

from pipeline.cache.encoded import (
    GEOMETRY_COLUMNS,
    open_labels,
    open_latents,
    read_index,
    read_prompts,
)
from pipeline.core.errors import DataError
from pipeline.data.datasets import DataConfig
from pipeline.data.images import load_image, sha256_file, write_png
from pipeline.data.manifest import INDEX_COLUMNS, build_index, make_manifest, write_manifest
from pipeline.diffusion.model import encode_images
from pipeline.diffusion.prompts import PromptConfig
from pipeline.diffusion.text import encode_text
from pipeline.loops.encode import EncodeConfig, check_paths, encode_dataset, encode_prompts


def make_domain(root, domain: str, n: int, seed: int, split: str = "val") -> None:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        img, lab = root / f"{domain}_{i}.png", root / f"{domain}_{i}_lab.png"
        write_png(img, rng.integers(0, 256, (40, 80, 3), dtype=np.uint8))
        write_png(lab, rng.choice([0, 1, 13, 255], (40, 80)).astype(np.uint8))
        rows.append(
            dict(
                image=str(img),
                label=str(lab),
                domain=domain,
                split=split,
                height=40,
                width=80,
                sha256=sha256_file(img),
            )
        )
    write_manifest(make_manifest(rows), root / f"{domain}.parquet")


def test_encode_writes_index_latents_labels_prompts(tmp_path):
    model = store_model(tmp_path / "model")
    make_domain(tmp_path, "zeta", 2, 0)
    make_domain(tmp_path, "alpha", 3, 1)
    index = build_index([tmp_path / "zeta.parquet", tmp_path / "alpha.parquet"])
    assert list(index["domain"]) == ["alpha"] * 3 + ["zeta"] * 2
    assert list(index["row"]) == [0, 1, 2, 0, 1]
    cfg = config("encode", EncodeConfig, resolution=list(RESOLUTION), batch_size=2)
    variants = config("prompts", PromptConfig, variants=["plain", "fog"])
    out = tmp_path / "encoded"
    # alpha's canvas is square: its 40x80 images keep their aspect (32x64) and are padded.
    canvases = {"alpha": [64, 64], "zeta": list(RESOLUTION)}
    encode_dataset(model, index, out, cfg, encode_prompts(model, variants), canvases)
    saved = read_index(out)
    assert saved[INDEX_COLUMNS].equals(index)
    assert (
        saved[GEOMETRY_COLUMNS].values.tolist() == [[64, 64, 32, 64]] * 3 + [[32, 64, 32, 64]] * 2
    )
    lat = open_latents(out, "zeta")
    assert lat.shape == (2, 1, 4, RESOLUTION[0] // 8, RESOLUTION[1] // 8)
    assert lat.attrs["model_fingerprint"] == model.fingerprint
    with torch.inference_mode():
        want = encode_images(model, load_image(index["image"][3], RESOLUTION)[None])
    np.testing.assert_allclose(lat[0, 0], want[0].numpy(), rtol=1e-5, atol=1e-5)
    labels = open_labels(out, "alpha")
    assert labels.shape == (3, 64, 64) and set(np.unique(labels[:])) <= {0, 1, 13, 255}
    assert (labels[:, 32:] == 255).all()  # the padding is ignored
    prompts = read_prompts(out)
    assert prompts.names == ["plain", "fog"] and prompts.model_fingerprint == model.fingerprint
    assert prompts.texts == ["", "a photo of a city street in fog"]
    with torch.inference_mode():
        torch.testing.assert_close(prompts.embeddings, encode_text(model, prompts.texts))


def test_draws_sample_the_posterior_and_distort_colors(tmp_path):
    """What DIFF draws afresh every iteration as K cached draws, each seeded by the image."""
    model = store_model(tmp_path / "model")
    make_domain(tmp_path, "zeta", 2, 0, split="train")
    index = build_index([tmp_path / "zeta.parquet"])
    prompts = encode_prompts(model, config("prompts", PromptConfig))
    canvas = {"zeta": list(RESOLUTION)}
    runs = {}
    for name, over in {
        "mean": {},
        "sample": {"posterior": "sample"},
        "sample2": {"posterior": "sample"},
        "photo": {"photometric": True},
        "photo2": {"photometric": True},
    }.items():
        cfg = config("encode", EncodeConfig, resolution=list(RESOLUTION), draws=3, **over)
        encode_dataset(model, index, tmp_path / name, cfg, prompts, canvas)
        runs[name] = np.asarray(open_latents(tmp_path / name, "zeta")[:])
    mean, sample, photo = runs["mean"], runs["sample"], runs["photo"]
    assert np.array_equal(mean[:, 0], mean[:, 1])  # the posterior mean: every draw alike
    assert not np.array_equal(sample[:, 0], sample[:, 1]) and not np.array_equal(sample, mean)
    assert np.array_equal(sample, runs["sample2"])  # seeded by the image, reproducible
    assert not np.array_equal(photo[:, 0], photo[:, 1])
    assert np.array_equal(photo, runs["photo2"])  # reproducible
    # Evaluation images are never distorted (mmseg's test pipeline has no distortion).
    make_domain(tmp_path, "eta", 2, 0, split="val")
    val = build_index([tmp_path / "eta.parquet"])
    cfg = config("encode", EncodeConfig, resolution=list(RESOLUTION), draws=2, photometric=True)
    encode_dataset(model, val, tmp_path / "val", cfg, prompts, {"eta": list(RESOLUTION)})
    plain = np.asarray(open_latents(tmp_path / "val", "eta")[:])
    assert np.array_equal(plain[:, 0], plain[:, 1])


def test_corrupt_image_leaves_no_output(tmp_path):
    model = store_model(tmp_path / "model")
    make_domain(tmp_path, "game", 2, 0)
    index = build_index([tmp_path / "game.parquet"])
    (tmp_path / "game_1.png").write_bytes(b"not a png")
    cfg = config("encode", EncodeConfig, resolution=list(RESOLUTION))
    prompts = encode_prompts(model, config("prompts", PromptConfig))
    with pytest.raises(DataError, match="game_1.png"):
        encode_dataset(model, index, tmp_path / "encoded", cfg, prompts, {})
    assert not (tmp_path / "encoded").exists()


def test_stage_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    store_model(tmp_path / "model")
    proc = subprocess.run(
        [
            sys.executable,
            "stages/encode.py",
            str(tmp_path),
            str(tmp_path / "datasets"),
            str(tmp_path / "model"),
            str(tmp_path / "enc"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "encode: error: no manifests (*.parquet) given; run prepare"
    assert not (tmp_path / "enc").exists()


def test_an_image_changed_since_prepare_is_refused(tmp_path):
    model = store_model(tmp_path / "model")
    make_domain(tmp_path, "game", 2, 0)
    index = build_index([tmp_path / "game.parquet"])
    other = np.random.default_rng(9).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    write_png(tmp_path / "game_1.png", other)  # a valid image, but not the manifest's
    cfg = config("encode", EncodeConfig, resolution=list(RESOLUTION))
    prompts = encode_prompts(model, config("prompts", PromptConfig))
    with pytest.raises(DataError, match=r"game_1.png: content differs from the manifest's sha256"):
        encode_dataset(model, index, tmp_path / "encoded", cfg, prompts, {})
    assert not (tmp_path / "encoded").exists()


@pytest.mark.parametrize("where", ["climbs", "absolute", "link"])
def test_manifest_paths_outside_the_dataset_root_are_refused(tmp_path, where):
    root, outside = tmp_path / "datasets" / "game", tmp_path / "elsewhere"
    root.mkdir(parents=True)
    outside.mkdir()
    make_domain(outside, "game", 1, 0)
    make_domain(root, "game", 2, 0)
    frame = build_index([root / "game.parquet"])
    data = config("data", DataConfig, source={"root": str(tmp_path / "datasets")})
    check_paths(frame, data, tmp_path / "prepared")  # inside: fine
    bad = {
        "climbs": str(root / ".." / ".." / "elsewhere" / "game_0.png"),
        "absolute": str(outside / "game_0.png"),
        "link": str(root / "link.png"),
    }[where]
    (root / "link.png").symlink_to(outside / "game_0.png")
    frame.loc[1, "image"] = bad
    with pytest.raises(DataError, match=r"image .* lies outside the dataset root"):
        check_paths(frame, data, tmp_path / "prepared")
