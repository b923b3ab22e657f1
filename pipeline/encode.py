"""Encode stage: the global image index, VAE latents, resized labels and prompt embeddings."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.diffusion import DiffusionModel, encode_images
from pipeline.encoded import (
    INDEX_COLUMNS,
    INDEX_NAME,
    LABELS_NAME,
    LATENTS_NAME,
    PROMPTS_NAME,
    ROWS_PER_SHARD,
    create_rows_array,
    save_prompts,
)
from pipeline.errors import DataError
from pipeline.fileio import atomic_path
from pipeline.images import read_image, read_label
from pipeline.manifest import read_manifest
from pipeline.store import index_fingerprint


@dataclasses.dataclass
class EncodeConfig:
    """params.yaml `encode` group."""

    resolution: list[int] = dataclasses.field(default_factory=lambda: [128, 256])  # H, W
    batch_size: int = 16
    prompts: list[str] = dataclasses.field(default_factory=lambda: [""])


def build_index(manifest_paths: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """Rows of all manifests, domains in sorted name order (row order kept within a domain)."""
    if not manifest_paths:
        raise DataError("no manifests given to encode")
    frames = [read_manifest(p) for p in manifest_paths]
    df = pd.concat(frames, ignore_index=True)
    # A stable sort keeps each manifest's own order within its domain.
    df = df.sort_values("domain", kind="stable").reset_index(drop=True)
    return df[INDEX_COLUMNS]


def load_image(path: str | os.PathLike[str], resolution: Sequence[int]) -> torch.Tensor:
    """Image resized (bilinear) to (H, W), as float32 (3, H, W) in [-1, 1]."""
    h, w = int(resolution[0]), int(resolution[1])
    img = read_image(path)
    if img.shape[:2] != (h, w):
        img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1.0


def load_label(path: str | os.PathLike[str], resolution: Sequence[int]) -> np.ndarray:
    """Train-id label resized (nearest) to (H, W), uint8 (255 = ignore)."""
    h, w = int(resolution[0]), int(resolution[1])
    lab = read_label(path)
    if lab.shape != (h, w):
        lab = np.asarray(Image.fromarray(lab).resize((w, h), Image.NEAREST))
    return lab


def encode_dataset(
    model: DiffusionModel,
    index: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    cfg: EncodeConfig,
) -> None:
    """Write out_dir/{index.parquet, latents.zarr, labels.zarr, prompts.safetensors} atomically."""
    h, w = int(cfg.resolution[0]), int(cfg.resolution[1])
    stride = model.vae_stride
    if h % stride or w % stride:
        raise DataError(f"encode.resolution {cfg.resolution} must be a multiple of {stride}")
    n = len(index)
    attrs = {
        "model_fingerprint": model.fingerprint,
        "resolution": [h, w],
        "images": index_fingerprint(index["sha256"]),
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        index.to_parquet(tmp / INDEX_NAME, index=False)
        c = model.vae.config.latent_channels
        latents = create_rows_array(
            tmp / LATENTS_NAME, (n, c, h // stride, w // stride), "float32", attrs
        )
        labels = create_rows_array(tmp / LABELS_NAME, (n, h, w), "uint8", attrs)
        # Batches are shard-aligned so each shard file is written once, whole.
        step = ROWS_PER_SHARD
        with torch.inference_mode(), tqdm(total=n, desc="encode", unit="img") as bar:
            for s0 in range(0, n, step):
                s1 = min(s0 + step, n)
                lat = np.empty((s1 - s0, *latents.shape[1:]), np.float32)
                lab = np.empty((s1 - s0, h, w), np.uint8)
                for b0 in range(s0, s1, cfg.batch_size):
                    b1 = min(b0 + cfg.batch_size, s1)
                    rows = index.iloc[b0:b1]
                    imgs = torch.stack([load_image(p, (h, w)) for p in rows["image"]])
                    z = encode_images(model, imgs, None)
                    lat[b0 - s0 : b1 - s0] = z.float().cpu().numpy()
                    for j, p in enumerate(rows["label"]):
                        lab[b0 - s0 + j] = load_label(p, (h, w))
                    bar.update(b1 - b0)
                latents[s0:s1] = lat
                labels[s0:s1] = lab
        save_prompts(model, list(cfg.prompts), tmp / PROMPTS_NAME)
