"""The encode loop: the image index, and per encoded set its images' VAE latents (K draws) and
labels; the prompt variants' embeddings.

A set is a domain's whole frames, fitted to the domain's canvas; with `encode.crop`, the
source's training images are instead K crop draws each, cut as DIFF's pipeline cuts them before
its UNet runs (mmseg Resize -> RandomCrop -> RandomFlip -> PhotoMetricDistortion -> Pad,
uda_gtaCAug_to_cityscapes_512x512.py:13-24): a seeded crop at any pixel offset with the sampling
group's cat_max_ratio retries and, with rare-class sampling, re-crops aimed at a class the image
is sampled for; a flip; a distortion; a posterior sample. Every draw is seeded by (image
content, purpose, draw, seed): the same in any order, on any machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from pydantic.dataclasses import dataclass
from tqdm import tqdm

from pipeline.cache.encoded import (
    BOXES_NAME,
    DRAW_PIXELS_NAME,
    GEOMETRY_COLUMNS,
    GUIDED_LATENTS_NAME,
    LABELS_NAME,
    LATENTS_NAME,
    PROMPTS_NAME,
    ROWS_PER_SHARD,
    Prompts,
    class_pixels,
    create_rows_array,
    crops_set,
    index_fingerprint,
    set_dir,
    write_index,
    write_prompts,
)
from pipeline.core.classes import NUM_CLASSES
from pipeline.core.device import check_device, resolve_device
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.fileio import atomic_path, write_timing
from pipeline.core.names import GUIDED_DIFF_PROMPT, GUIDED_PROMPT
from pipeline.core.params import STRICT, Positive, Resolution
from pipeline.data.augment import photometric_distortion
from pipeline.data.datasets import DataConfig
from pipeline.data.images import (
    canvas_tensor,
    fit,
    fit_size,
    pad_label,
    read_image,
    read_train_ids,
)
from pipeline.data.manifest import build_index
from pipeline.data.sampling import (
    CropSampling,
    RcsTable,
    SamplingConfig,
    pixel_counts,
    rcs_crop,
)
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.model import DiffusionModel, load_diffusion_model
from pipeline.diffusion.prompts import PromptConfig, text_of, variant_prompts
from pipeline.diffusion.text import check_prompt_lengths, encode_text


@dataclass(config=STRICT)
class EncodeConfig:
    """The `encode` group. What DIFF draws afresh every iteration becomes K cached draws."""

    resolution: Resolution  # the canvas (H, W) of a domain whose entry sets none
    batch_size: Positive
    draws: Positive  # K draws per training image (V = prompt variants x K in the stores)
    posterior: Literal["mean", "sample"]  # sample: DIFF's VAE posterior sample (per draw)
    photometric: bool  # DIFF's PhotoMetricDistortion (GTA), one per draw of training images
    # [h, w]: each draw of a training image is a crop of this size, encoded, inverted and
    # extracted as such (DIFF's 512x512); null: whole frames (crops, if any, in feature space)
    crop: Annotated[list[Positive], Field(min_length=2, max_length=2)] | None
    seed: int  # of posterior samples, crops and distortions (with each image's content hash)


def draw_seed(sha256: str, what: str, draw: int, seed: int) -> int:
    """A 63-bit seed from (image content, purpose, draw, seed): the same in any order."""
    key = f"{sha256}:{what}:{int(draw)}:{int(seed)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def draw_generator(sha256: str, what: str, draw: int, seed: int) -> torch.Generator:
    """A torch generator seeded by draw_seed."""
    return torch.Generator("cpu").manual_seed(draw_seed(sha256, what, draw, seed))


def encode_prompts(model: DiffusionModel, cfg: PromptConfig) -> Prompts:
    """The prompt variants of `cfg` with their text-encoder embeddings, in store order."""
    texts = variant_prompts(cfg)
    check_prompt_lengths(model.tokenizer, texts)
    with torch.inference_mode():
        emb = encode_text(model, [text_of(t)[0] for t in texts.values()])
    return Prompts(list(texts), list(texts.values()), emb, model.fingerprint)


def encoding_attrs(cfg: EncodeConfig, crops: CropSampling | None, draws: int) -> dict:
    """What a set's latents depend on besides the model and images (a store records it)."""
    attrs: dict = {
        "draws": draws,
        "posterior": cfg.posterior,
        "photometric": cfg.photometric,
        "seed": cfg.seed,
        "resize": "cv2-bilinear",
    }
    if crops is not None:
        attrs["crop"] = {"size": list(cfg.crop), **dataclasses.asdict(crops)}
    return attrs


@dataclasses.dataclass
class Drawn:
    """One draw of one image: its pixels before padding, its label padded to the set's size, and
    the crop box (y0, x0, flipped, the class its re-crops aimed at or -1)."""

    image: np.ndarray
    label: np.ndarray
    box: tuple[int, int, int, int] = (0, 0, 0, -1)


def frame_draws(row: pd.Series, canvas: list[int], cfg: EncodeConfig, draws: int) -> list[Drawn]:
    """K draws of a whole frame fitted to its canvas: the photometric distortion per draw of a
    training image (mmseg distorts training images only)."""
    fitted = fit(read_image(row["image"], row["sha256"]), canvas)
    label = pad_label(fit(read_train_ids(row["label"], row["label_sha256"]), canvas, True), canvas)
    out = []
    for k in range(draws):
        img = fitted
        if cfg.photometric and row["split"] == "train":
            rng = np.random.default_rng(draw_seed(row["sha256"], "photometric", k, cfg.seed))
            img = photometric_distortion(fitted, rng)
        out.append(Drawn(img, label))
    return out


def crop_draws(
    row: pd.Series,
    canvas: list[int],
    cfg: EncodeConfig,
    crops: CropSampling,
    aim: np.ndarray | None,
) -> list[Drawn]:
    """K crop draws of a training image, as DIFF's pipeline cuts them (module docstring).

    `aim` is P(class | this image) of rare-class sampling: each draw's re-crops aim at a class
    drawn from it (so the cache holds crops of the classes the image is sampled for); None: no
    re-crops."""
    fitted = fit(read_image(row["image"], row["sha256"]), canvas)
    label = fit(read_train_ids(row["label"], row["label_sha256"]), canvas, nearest=True)
    size = (int(cfg.crop[0]), int(cfg.crop[1]))
    area = (label.shape[0], label.shape[1])
    out = []
    for k in range(cfg.draws):
        rng = np.random.default_rng(draw_seed(row["sha256"], "crop", k, cfg.seed))
        cls = None
        if aim is not None and aim.sum() > 0:
            cls = int(rng.choice(len(aim), p=aim))
        wanted = crops.rcs.wanted if crops.rcs is not None else 0.0
        y0, x0 = rcs_crop(rng, label, area, size, crops.cat_max_ratio, cls, wanted)
        img = fitted[y0 : y0 + size[0], x0 : x0 + size[1]]
        lab = label[y0 : y0 + size[0], x0 : x0 + size[1]]
        flip = bool(crops.flip and rng.random() < 0.5)
        if flip:
            img, lab = img[:, ::-1], lab[:, ::-1]
        if cfg.photometric:
            img = photometric_distortion(np.ascontiguousarray(img), rng)
        box = (y0, x0, int(flip), -1 if cls is None else cls)
        out.append(Drawn(np.ascontiguousarray(img), pad_label(lab, size), box))
    return out


@torch.inference_mode()
def posterior_latents(
    model: DiffusionModel,
    images: torch.Tensor,
    shas: list[str],
    draws: int,
    cfg: EncodeConfig,
    paths: tuple[str, ...],
) -> dict[str, np.ndarray]:
    """(B*K, 3, H, W) images, K per sha in order -> per path (B, K, C, h, w) latents x scaling
    factor: the posterior mean, or one sample per draw and path ("posterior": the plain view;
    "posterior-guided": the guided view's own, as DIFF encodes each view afresh)."""
    dist = model.vae.encode(images.to(model.vae.device, model.vae.dtype)).latent_dist
    mean = dist.mean.float()
    out = {}
    for path in paths:
        z = mean
        if cfg.posterior == "sample":
            eps = torch.stack(
                [
                    torch.randn(mean.shape[1:], generator=draw_generator(sha, path, k, cfg.seed))
                    for sha in shas
                    for k in range(draws)
                ]
            )
            z = mean + dist.std.float() * eps.to(mean.device)
        z = z * model.vae.config.scaling_factor
        out[path] = z.view(len(shas), draws, *z.shape[1:]).cpu().numpy()
    return out


def read_class_pixels(rows: pd.DataFrame, threads: int = 4) -> np.ndarray:
    """(N, classes) pixel counts of the rows' original labels, each checked (hash and ids)."""

    def count(r: tuple[str, str]) -> np.ndarray:
        return pixel_counts(read_train_ids(*r))

    pairs = list(zip(rows["label"], rows["label_sha256"], strict=True))
    with ThreadPoolExecutor(threads) as pool:
        counts = list(tqdm(pool.map(count, pairs), total=len(pairs), desc="label statistics"))
    return np.stack(counts) if counts else np.zeros((0, NUM_CLASSES), np.int64)


def encode_set(
    model: DiffusionModel,
    rows: pd.DataFrame,
    canvas: list[int],
    out: Path,
    cfg: EncodeConfig,
    crops: CropSampling | None,
    guided: bool,
    aims: np.ndarray | None = None,
) -> pd.DataFrame:
    """One set's latents and labels under `out`; returns its rows with their geometry.

    Frames: K draws for a set holding training images, else one (only draw 0 is ever read).
    `aims` (N, classes): each crop-draw row's P(class | image) for re-crops, or None.
    """
    size = list(cfg.crop) if crops is not None else list(canvas)  # run checked both (check_sizes)
    draws = cfg.draws if crops is not None or (rows["split"] == "train").any() else 1
    h, w = size
    n = len(rows)
    attrs = {
        "model_fingerprint": model.fingerprint,
        "resolution": [h, w],
        "images": index_fingerprint(rows["sha256"]),
        "encoding": encoding_attrs(cfg, crops, draws),
    }
    c, f = model.vae.config.latent_channels, model.vae_stride
    paths = (
        ("posterior", "posterior-guided")
        if guided and cfg.posterior == "sample"
        else ("posterior",)
    )
    names = {"posterior": LATENTS_NAME, "posterior-guided": GUIDED_LATENTS_NAME}
    latents = {
        p: create_rows_array(out / names[p], (n, draws, c, h // f, w // f), "float32", attrs)
        for p in paths
    }
    label_shape = (n, draws, h, w) if crops is not None else (n, h, w)
    labels = create_rows_array(out / LABELS_NAME, label_shape, "uint8", attrs)
    extra = {}
    if crops is not None:
        extra["boxes"] = create_rows_array(out / BOXES_NAME, (n, draws, 4), "int32", attrs)
        extra["pixels"] = create_rows_array(out / DRAW_PIXELS_NAME, (n, draws, 19), "int64", attrs)
    geometry = []
    with tqdm(total=n * draws, desc=f"encode {out.name}", unit="draw") as bar:
        # Shard-aligned: each shard file is written once, whole.
        for s0 in range(0, n, ROWS_PER_SHARD):
            s1 = min(s0 + ROWS_PER_SHARD, n)
            lat = {p: np.empty((s1 - s0, *latents[p].shape[1:]), np.float32) for p in paths}
            lab = np.empty((s1 - s0, *label_shape[1:]), np.uint8)
            boxes = np.zeros((s1 - s0, draws, 4), np.int32)
            pixels = np.zeros((s1 - s0, draws, 19), np.int64)
            for b0 in range(s0, s1, cfg.batch_size):
                b1 = min(b0 + cfg.batch_size, s1)
                drawn = []
                for i in range(b0, b1):
                    row = rows.iloc[i]
                    if crops is None:
                        d = frame_draws(row, canvas, cfg, draws)
                        lab[i - s0] = d[0].label
                        content = fit_size(int(row["height"]), int(row["width"]), canvas)
                    else:
                        aim = None if aims is None else aims[i]
                        d = crop_draws(row, canvas, cfg, crops, aim)
                        for k, one in enumerate(d):
                            lab[i - s0, k] = one.label
                            boxes[i - s0, k] = one.box
                            pixels[i - s0, k] = pixel_counts(one.label)
                        fitted = fit_size(int(row["height"]), int(row["width"]), canvas)
                        content = (min(h, fitted[0]), min(w, fitted[1]))
                    geometry.append([h, w, *content])
                    drawn += d
                images = torch.stack([canvas_tensor(x.image, size) for x in drawn])
                shas = [str(s) for s in rows["sha256"].iloc[b0:b1]]
                for p, z in posterior_latents(model, images, shas, draws, cfg, paths).items():
                    lat[p][b0 - s0 : b1 - s0] = z
                bar.update((b1 - b0) * draws)
            for p in paths:
                latents[p][s0:s1] = lat[p]
            labels[s0:s1] = lab
            if crops is not None:
                extra["boxes"][s0:s1] = boxes
                extra["pixels"][s0:s1] = pixels
    return rows.assign(**dict(zip(GEOMETRY_COLUMNS, np.asarray(geometry).T, strict=True)))


def encode_dataset(
    model: DiffusionModel,
    index: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    cfg: EncodeConfig,
    prompts: Prompts,
    resolutions: dict[str, list[int]],
    crops: CropSampling | None = None,
) -> None:
    """Write out_dir/{index.parquet, <set>/..., prompts.safetensors} atomically; `resolutions`
    gives each domain's canvas. The index records each image's class pixel counts."""
    guided = any(t in (GUIDED_PROMPT, GUIDED_DIFF_PROMPT) for t in prompts.texts)
    index = index.assign(class_pixels=list(read_class_pixels(index)))
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        parts = []
        for name in sorted(set(index["set"])):
            rows = index[index["set"] == name].sort_values("row").reset_index(drop=True)
            domain = str(rows["domain"].iloc[0])
            canvas = list(resolutions.get(domain, cfg.resolution))
            cut = crops if name == crops_set(domain) else None
            aims = None
            if cut is not None and cut.rcs is not None:
                table = RcsTable(class_pixels(rows), cut.rcs)
                aims = np.stack([table.class_given_image(i) for i in range(len(rows))])
            set_dir(tmp, name).mkdir()
            parts.append(
                encode_set(model, rows, canvas, set_dir(tmp, name), cfg, cut, guided, aims)
            )
        full = pd.concat(parts, ignore_index=True)
        full[GEOMETRY_COLUMNS] = full[GEOMETRY_COLUMNS].astype("int64")
        write_index(full, tmp)
        write_prompts(prompts, tmp / PROMPTS_NAME)


def check_paths(
    index: pd.DataFrame, data: DataConfig, datasets_dir: str | os.PathLike[str]
) -> None:
    """Every image inside its domain's dataset root, every label there or in the prepared
    labels folder: a manifest cannot send encode elsewhere (absolute paths, `..`, links)."""
    entries = {data.source_name: data.source, **data.targets}
    prepared = Path(datasets_dir).resolve()
    for domain, rows in index.groupby("domain"):
        if domain not in entries:
            raise DataError(
                f"manifest of domain {domain!r}: not a domain of params `data` "
                f"({sorted(entries)}); rerun prepare"
            )
        root = Path(entries[domain].root).resolve()
        for image, label in zip(rows["image"], rows["label"], strict=True):
            if not Path(image).resolve().is_relative_to(root):
                raise DataError(
                    f"manifest of {domain}: image {image} lies outside the dataset root {root}"
                )
            lab = Path(label).resolve()
            if not (lab.is_relative_to(root) or lab.is_relative_to(prepared)):
                raise DataError(
                    f"manifest of {domain}: label {label} lies outside {root} and {prepared}"
                )


def check_sizes(cfg: EncodeConfig, data: DataConfig, multiple: int) -> None:
    """Every size the UNet sees (each domain's canvas, the crop draws') is a multiple of
    `multiple`, the model's pixel_multiple (SD: the VAE's 8 times three UNet halvings, 64)."""
    sizes = {"encode.crop": cfg.crop} if cfg.crop else {}
    entries = {data.source_name: ("data.source", data.source)}
    entries |= {n: (f"data.targets.{n}", e) for n, e in data.targets.items()}
    for key, entry in entries.values():
        if entry.resolution is not None:
            sizes[f"{key}.resolution"] = entry.resolution
        else:
            sizes["encode.resolution"] = cfg.resolution
    bad = [f"{k} {list(v)}" for k, v in sizes.items() if v[0] % multiple or v[1] % multiple]
    if bad:
        raise ConfigError(
            f"{', '.join(bad)}: must be a multiple of {multiple} (the UNet's grid: the VAE's "
            "stride times the UNet's halvings)"
        )


def check_crop(cfg: EncodeConfig, feature_crop: list[int] | None) -> None:
    """Crop draws and feature-space crops exclude each other (refused here, before DVC removes
    anything downstream)."""
    if cfg.crop is not None and feature_crop is not None:
        raise ConfigError(
            f"encode.crop {cfg.crop} and sampling.feature_crop {feature_crop}: crop draws are "
            "read whole; set sampling.feature_crop: null (or encode.crop: null for "
            "feature-space crops of frames)"
        )


def run(
    cfg: EncodeConfig,
    sampling: SamplingConfig,
    prompts: PromptConfig,
    data: DataConfig,
    model_cfg: ModelConfig,
    manifests_dir: str,
    datasets_dir: str,
    model_dir: str,
    out: str,
    metrics_path: str,
) -> None:
    """The encode stage: the VAE and text encoder only (the UNet is not needed here); its
    seconds and megabytes to `metrics_path`."""
    start = time.perf_counter()
    check_device(model_cfg.device, "model.device", model_cfg.dtype)
    check_crop(cfg, sampling.feature_crop)
    manifests = sorted(Path(manifests_dir).glob("*.parquet"))
    source = data.source_name

    def set_of(domain: str, split: str) -> str:
        return crops_set(domain) if cfg.crop and domain == source and split == "train" else domain

    index = build_index(manifests, set_of)  # bad manifests stop the stage before the model loads
    check_paths(index, data, datasets_dir)
    model = load_diffusion_model(
        model_dir,
        model_cfg.dtype,
        resolve_device(model_cfg.device, "model.device"),
        parts=("vae", "text_encoder"),
    )
    check_sizes(cfg, data, model.pixel_multiple)
    resolutions = data.resolutions(cfg.resolution)
    encode_dataset(
        model,
        index,
        out,
        cfg,
        encode_prompts(model, prompts),
        resolutions,
        sampling.crop_sampling() if cfg.crop else None,
    )
    write_timing(metrics_path, time.perf_counter() - start, out)
    print(f"encoded {len(index)} images from {len(manifests)} manifests -> {out}")
