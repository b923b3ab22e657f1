"""Shared fixtures of the store tests: a tiny saved SD-family model and a fake data/encoded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.diffusion import (
    DiffusionModel,
    SmallModelConfig,
    build_small_model,
    save_diffusion_model,
)
from pipeline.encoded import (
    INDEX_NAME,
    LABELS_NAME,
    LATENTS_NAME,
    PROMPTS_NAME,
    create_rows_array,
    save_prompts,
)
from pipeline.store import index_fingerprint

TINY = SmallModelConfig(
    vae_channels=[8, 8, 8, 8],
    unet_channels=[8, 16],
    unet_heads=[1, 2],
    norm_num_groups=4,
    text_hidden=16,
    text_layers=1,
    text_heads=1,
    sample_size=32,
)
RESOLUTION = (32, 64)


def tiny_model(path: Path) -> DiffusionModel:
    """A saved random tiny model (so it has a fingerprint and loads in subprocesses)."""
    model = build_small_model(TINY, seed=0)
    save_diffusion_model(model, path)
    return model


def make_encoded(
    out: Path, model: DiffusionModel, n: int, prompts: tuple[str, ...] = ("",), seed: int = 0
) -> pd.DataFrame:
    """A data/encoded folder with random latents and labels (no images needed)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    h, w = RESOLUTION
    shas = [hashlib.sha256(f"img{i}".encode()).hexdigest() for i in range(n)]
    index = pd.DataFrame(
        {
            "domain": ["game"] * (n - n // 3) + ["real"] * (n // 3),
            "split": ["train"] * (n - n // 3) + ["val"] * (n // 3),
            "image": [f"img{i}.png" for i in range(n)],
            "label": [f"lab{i}.png" for i in range(n)],
            "sha256": shas,
            "height": h,
            "width": w,
        }
    )
    index.to_parquet(out / INDEX_NAME, index=False)
    attrs = {"model_fingerprint": model.fingerprint, "resolution": [h, w]}
    attrs["images"] = index_fingerprint(shas)
    lat = create_rows_array(out / LATENTS_NAME, (n, 4, h // 8, w // 8), "float32", attrs)
    lat[:] = rng.standard_normal(lat.shape).astype(np.float32)
    lab = create_rows_array(out / LABELS_NAME, (n, h, w), "uint8", attrs)
    lab[:] = rng.integers(0, 19, size=lab.shape).astype(np.uint8)
    save_prompts(model, list(prompts), out / PROMPTS_NAME)
    return index


def write_params(path: Path, **extract: object) -> Path:
    """A params.yaml with the extract group (plus the model keys the stage reads)."""
    group = {"timesteps": [50], "taps": "diff", "batch_size": 2, "noise_seed": 0}
    group.update({"storage": "fp16", "images_per_shard": 2, **extract})
    path.write_text(yaml.safe_dump({"model": {"dtype": "fp32", "device": "cpu"}, "extract": group}))
    return path
