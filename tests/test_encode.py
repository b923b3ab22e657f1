"""Encode: sorted-domain index, latents, nearest-resized labels, prompts; atomic on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import RESOLUTION, config, encode_images, store_model
from PIL import Image

from pipeline.cache.encoded import (
    GEOMETRY_COLUMNS,
    open_draw_pixels,
    open_labels,
    open_latents,
    read_index,
    read_prompts,
    set_dir,
)
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.fileio import file_digest
from pipeline.data.datasets import DataConfig
from pipeline.data.images import canvas_tensor, fit, load_image, read_image, write_png
from pipeline.data.manifest import INDEX_COLUMNS, build_index, make_manifest, write_manifest
from pipeline.data.sampling import RareClassSampling, pixel_counts
from pipeline.diffusion.model import load_diffusion_model
from pipeline.diffusion.prompts import PromptConfig
from pipeline.diffusion.text import encode_text
from pipeline.loops.encode import (
    CropSampling,
    EncodeConfig,
    check_crop,
    check_paths,
    encode_dataset,
    encode_prompts,
)


def make_domain(
    root, domain: str, n: int, seed: int, split: str = "val", label=None, size=(40, 80)
) -> None:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        img, lab = root / f"{domain}_{i}.png", root / f"{domain}_{i}_lab.png"
        write_png(img, rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        write_png(
            lab, rng.choice([0, 1, 13, 255], size).astype(np.uint8) if label is None else label
        )
        rows.append(
            dict(
                image=str(img),
                label=str(lab),
                domain=domain,
                split=split,
                height=size[0],
                width=size[1],
                sha256=file_digest(img),
                label_sha256=file_digest(lab),
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
    distorted = np.asarray(open_latents(tmp_path / "val", "eta")[:])
    cfg = config("encode", EncodeConfig, resolution=list(RESOLUTION), draws=2)
    encode_dataset(model, val, tmp_path / "val0", cfg, prompts, {"eta": list(RESOLUTION)})
    assert np.array_equal(distorted, np.asarray(open_latents(tmp_path / "val0", "eta")[:]))
    # ... and a set without training images holds one draw: evaluation reads draw 0 only.
    assert distorted.shape[1] == 1


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
            str(tmp_path / "encode.json"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "encode: error: no manifests (*.parquet) given; run prepare"
    assert not (tmp_path / "enc").exists() and not (tmp_path / "encode.json").exists()


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


CROP = [32, 32]
FRAME = (48, 96)  # images and their canvas: crops of 32x32 at any of 17 x 65 offsets


def _crop_encoded(tmp_path, name, *, seed=0, draws=3, crops=None, label=None, **over):
    if (tmp_path / "model").exists():
        model = load_diffusion_model(tmp_path / "model")
    else:
        model = store_model(tmp_path / "model")
    if not (tmp_path / "game.parquet").exists():
        make_domain(tmp_path, "game", 3, 0, split="train", label=label, size=FRAME)
        make_domain(tmp_path, "real", 2, 1, split="val", size=FRAME)
    index = build_index(
        [tmp_path / "game.parquet", tmp_path / "real.parquet"],
        lambda d, s: "game-crops" if d == "game" and s == "train" else d,
    )
    cfg = config("encode", EncodeConfig, draws=draws, crop=CROP, seed=seed, batch_size=2, **over)
    crops = crops or CropSampling(flip=True, cat_max_ratio=1.0, rcs=None)
    prompts = encode_prompts(model, config("prompts", PromptConfig))
    canvases = {"game": list(FRAME), "real": list(FRAME)}
    encode_dataset(model, index, tmp_path / name, cfg, prompts, canvases, crops)
    return model, index


def test_crop_draws_are_cut_before_the_vae_as_diff_cuts_them(tmp_path):
    """DIFF's pipeline (Resize, RandomCrop at any pixel, RandomFlip, PhotoMetricDistortion, Pad;
    uda_gtaCAug_to_cityscapes_512x512.py:13-24) runs before its VAE and UNet: each cached
    draw is such a crop, encoded at crop size, with its own label."""
    model, index = _crop_encoded(tmp_path, "enc")
    out = tmp_path / "enc"
    saved = read_index(out)
    assert sorted(set(saved["set"])) == ["game-crops", "real"]
    assert set(saved.loc[saved["set"] == "game-crops", "split"]) == {"train"}
    lat = open_latents(out, "game-crops")
    assert lat.shape == (3, 3, 4, CROP[0] // 8, CROP[1] // 8)
    labels = open_labels(out, "game-crops")
    assert labels.shape == (3, 3, *CROP)
    boxes = np.asarray(zarr_open(set_dir(out, "game-crops") / "boxes.zarr")[:])
    assert boxes.shape == (3, 3, 4) and (boxes[..., 3] == -1).all()  # no rare-class aim
    # Any pixel offset (not a feature grid), flips about half the time.
    assert (boxes[..., 0] % 8).any() or (boxes[..., 1] % 8).any()
    assert 0 < boxes[..., 2].sum() < 9
    rows = index[index["set"] == "game-crops"].reset_index(drop=True)
    for i in range(3):
        frame = fit(read_image(rows["image"][i]), FRAME)
        original = np.asarray(Image.open(rows["label"][i]))
        for k in range(3):
            y0, x0, flip, _ = (int(v) for v in boxes[i, k])
            want = original[y0 : y0 + 32, x0 : x0 + 32]
            crop = frame[y0 : y0 + 32, x0 : x0 + 32]
            if flip:
                want, crop = want[:, ::-1], crop[:, ::-1]
            np.testing.assert_array_equal(labels[i, k], want)
            with torch.inference_mode():
                z = encode_images(model, canvas_tensor(np.ascontiguousarray(crop), CROP)[None])
            np.testing.assert_allclose(lat[i, k], z[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        open_draw_pixels(out, "game-crops"),
        np.stack([[pixel_counts(labels[i, k]) for k in range(3)] for i in range(3)]),
    )
    # The targets stay whole frames, one draw.
    assert open_latents(out, "real").shape[:2] == (2, 1)
    assert open_labels(out, "real").shape == (2, *FRAME)


def test_crop_draws_are_reproducible_and_seeded(tmp_path):
    _crop_encoded(tmp_path, "a", posterior="sample", photometric=True)
    _crop_encoded(tmp_path, "b", posterior="sample", photometric=True)
    _crop_encoded(tmp_path, "c", posterior="sample", photometric=True, seed=1)
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert files == sorted(
        p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    a = np.asarray(zarr_open(tmp_path / "a" / "game-crops" / "boxes.zarr")[:])
    c = np.asarray(zarr_open(tmp_path / "c" / "game-crops" / "boxes.zarr")[:])
    assert not np.array_equal(a, c)
    # The store identity of every set records how it was cut.
    enc = open_latents(tmp_path / "a", "game-crops").attrs["encoding"]
    assert enc["crop"] == {"size": CROP, "flip": True, "cat_max_ratio": 1.0, "rcs": None}
    assert "crop" not in open_latents(tmp_path / "a", "real").attrs["encoding"]


def test_crop_draws_aim_their_recrops_at_the_classes_an_image_is_sampled_for(tmp_path):
    """With rare-class sampling, each draw's re-crops (DAFormer: until the crop holds
    min_pixels x min_crop_ratio of the class, 10 times at most) aim at a class drawn from
    P(class | image): the cache holds crops of the rare class the image is picked for."""
    label = np.zeros(FRAME, np.uint8)
    label[:, 48:] = 1
    label[28:48, 70:96] = 12  # a rider in the bottom-right corner
    rcs = RareClassSampling(temperature=0.01, min_pixels=100, min_crop_ratio=0.5)
    _crop_encoded(
        tmp_path,
        "enc",
        draws=4,
        label=label,
        crops=CropSampling(flip=False, cat_max_ratio=1.0, rcs=rcs),
    )
    boxes = np.asarray(zarr_open(tmp_path / "enc" / "game-crops" / "boxes.zarr")[:])
    pixels = open_draw_pixels(tmp_path / "enc", "game-crops")
    assert (boxes[..., 3] == 12).mean() > 0.9  # aimed at the rare rider
    assert (pixels[..., 12][boxes[..., 3] == 12] > 50).all()  # and they hold it
    # A random crop holds the corner rider about 2 times in 5.
    _crop_encoded(
        tmp_path,
        "free",
        draws=4,
        label=label,
        crops=CropSampling(flip=False, cat_max_ratio=1.0, rcs=None),
    )
    free = open_draw_pixels(tmp_path / "free", "game-crops")
    assert (free[..., 12] > 50).mean() < 0.7


def test_crop_draws_and_feature_space_crops_exclude_each_other():
    cfg = config("encode", EncodeConfig, crop=[32, 32])
    with pytest.raises(
        ConfigError, match=r"encode.crop \[32, 32\] and sampling.feature_crop \[16, 16\]"
    ):
        check_crop(cfg, [16, 16])
    check_crop(cfg, None)
    check_crop(config("encode", EncodeConfig), [16, 16])


def zarr_open(path):
    return zarr.open_array(path, mode="r")


def test_rare_class_statistics_count_the_original_labels(tmp_path):
    """DAFormer's sample_class_stats count each original label (GTA: 1914x1052; convert
    tools/convert_datasets/gta.py:35-43), not the resized one: 40x80 labels on a 32x64 canvas."""
    model = store_model(tmp_path / "model")
    make_domain(tmp_path, "game", 2, 0, split="train")
    index = build_index([tmp_path / "game.parquet"])
    cfg = config("encode", EncodeConfig, resolution=list(RESOLUTION))
    encode_dataset(
        model,
        index,
        tmp_path / "enc",
        cfg,
        encode_prompts(model, config("prompts", PromptConfig)),
        {},
    )
    saved = read_index(tmp_path / "enc")
    for i in range(2):
        original = np.asarray(Image.open(saved["label"][i]))
        np.testing.assert_array_equal(saved["class_pixels"][i], pixel_counts(original))
    canvas = np.asarray(open_labels(tmp_path / "enc", "game")[0])
    assert pixel_counts(canvas).sum() < np.asarray(saved["class_pixels"][0]).sum()


def test_a_label_changed_since_prepare_or_not_of_train_ids_is_refused(tmp_path):
    model = store_model(tmp_path / "model")
    make_domain(tmp_path, "game", 2, 0, split="train")
    index = build_index([tmp_path / "game.parquet"])
    cfg = config("encode", EncodeConfig, resolution=list(RESOLUTION))
    prompts = encode_prompts(model, config("prompts", PromptConfig))
    label = np.asarray(Image.open(tmp_path / "game_1_lab.png")).copy()
    label[0, 0] = 200
    write_png(tmp_path / "game_1_lab.png", label)
    with pytest.raises(DataError, match=r"game_1_lab.png: content differs from the manifest's"):
        encode_dataset(model, index, tmp_path / "enc", cfg, prompts, {})
    index.loc[1, "label_sha256"] = file_digest(tmp_path / "game_1_lab.png")
    with pytest.raises(DataError, match=r"game_1_lab.png: label ids \[200\] are not train ids"):
        encode_dataset(model, index, tmp_path / "enc", cfg, prompts, {})
    assert not (tmp_path / "enc").exists()
