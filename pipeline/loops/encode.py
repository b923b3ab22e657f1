"""The encode loop: the global image index, VAE latents, resized labels and prompt embeddings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic.dataclasses import dataclass
from tqdm import tqdm

from pipeline.cache.encoded import (
    INDEX_NAME,
    LABELS_NAME,
    LATENTS_NAME,
    PROMPTS_NAME,
    ROWS_PER_SHARD,
    Prompts,
    create_rows_array,
    index_fingerprint,
    write_prompts,
)
from pipeline.core.errors import DataError
from pipeline.core.fileio import atomic_path
from pipeline.core.params import STRICT, Positive, Resolution
from pipeline.data.images import load_image, load_label
from pipeline.data.manifest import build_index
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.model import DiffusionModel, encode_images, load_diffusion_model
from pipeline.diffusion.prompts import PromptConfig, variant_prompts
from pipeline.diffusion.text import encode_text


@dataclass(config=STRICT)
class EncodeConfig:
    """The `encode` group."""

    resolution: Resolution  # (H, W) fed to the VAE
    batch_size: Positive


def encode_prompts(model: DiffusionModel, cfg: PromptConfig) -> Prompts:
    """The prompt variants of `cfg` with their text-encoder embeddings, in store order."""
    texts = variant_prompts(cfg)
    with torch.inference_mode():
        emb = encode_text(model, list(texts.values()))
    return Prompts(list(texts), list(texts.values()), emb, model.fingerprint)


def encode_dataset(
    model: DiffusionModel,
    index: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    cfg: EncodeConfig,
    prompts: Prompts,
) -> None:
    """Write out_dir/{index.parquet, latents.zarr, labels.zarr, prompts.safetensors} atomically."""
    h, w = cfg.resolution
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
        with torch.inference_mode(), tqdm(total=n, desc="encode", unit="img") as bar:
            for s0 in range(0, n, ROWS_PER_SHARD):
                s1 = min(s0 + ROWS_PER_SHARD, n)
                lat = np.empty((s1 - s0, *latents.shape[1:]), np.float32)
                lab = np.empty((s1 - s0, h, w), np.uint8)
                for b0 in range(s0, s1, cfg.batch_size):
                    b1 = min(b0 + cfg.batch_size, s1)
                    rows = index.iloc[b0:b1]
                    imgs = torch.stack([load_image(p, (h, w)) for p in rows["image"]])
                    lat[b0 - s0 : b1 - s0] = encode_images(model, imgs).float().cpu().numpy()
                    for j, p in enumerate(rows["label"]):
                        lab[b0 - s0 + j] = load_label(p, (h, w))
                    bar.update(b1 - b0)
                latents[s0:s1] = lat
                labels[s0:s1] = lab
        write_prompts(prompts, tmp / PROMPTS_NAME)


def run(
    cfg: EncodeConfig, prompts: PromptConfig, model_cfg: ModelConfig, manifests_dir: str,
    model_dir: str, out: str,
) -> None:  # fmt: skip
    """The encode stage: the VAE and text encoder only (the UNet is not needed here)."""
    manifests = sorted(Path(manifests_dir).glob("*.parquet"))
    index = build_index(manifests)  # bad manifests stop the stage before the model loads
    model = load_diffusion_model(
        model_dir, model_cfg.dtype, model_cfg.device, parts=("vae", "text_encoder")
    )
    encode_dataset(model, index, out, cfg, encode_prompts(model, prompts))
    print(f"encoded {len(index)} images from {len(manifests)} manifests -> {out}")
