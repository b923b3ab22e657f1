"""A project folder at the embedded default's size (or `scale` times it) for timing train and
evaluate without the UNet.

Real on-disk stores (fp16 Zarr v3, sharded, per domain) with the default small model's DIFF tap
shapes, real per-domain labels.zarr, label PNGs and the index; feature values are a fixed
random projection of the pooled label plus domain-dependent noise, so heads learn something.
params.yaml is the project's, so the defaults are what is timed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

from pipeline.cache.encoded import (
    INDEX_NAME,
    LABELS_NAME,
    PROMPTS_NAME,
    Prompts,
    create_rows_array,
    index_fingerprint,
    write_prompts,
)
from pipeline.cache.store import FeatureStore, StoreIdentity, store_path
from pipeline.core.classes import NUM_CLASSES
from pipeline.core.params import load_params, read_group
from pipeline.diffusion.build import SmallModelConfig, build_small_model
from pipeline.diffusion.taps import resolve_taps

ROOT = Path(__file__).resolve().parents[1]
SPLITS = {
    "game": {"train": 400, "val": 80},
    "real": {"val": 80},
    "fog": {"val": 80},
    "night": {"val": 80},
    "rain": {"val": 80},
}
NOISE = {"game": 0.5, "real": 1.0, "fog": 1.5, "night": 2.0, "rain": 1.2}


def street_label(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    lab = np.full((h, w), 2, np.uint8)  # building
    lab[: h // 4] = 10  # sky
    lab[h // 2 :] = 0  # road
    lab[h // 2 :, : w // 6] = 1  # sidewalk
    for c in rng.choice([5, 8, 11, 13, 14, 18], size=4):
        y, x = int(rng.integers(h // 3, h - 16)), int(rng.integers(0, w - 24))
        lab[y : y + int(rng.integers(6, 16)), x : x + int(rng.integers(6, 24))] = c
    return lab


def make_project(
    root: Path, timesteps: list[int], size: tuple[int, int] = (128, 256), scale: int = 1
) -> int:
    """Write root/{params.yaml, data/encoded, data/features}; returns the number of images."""
    h, w = size
    params = load_params(ROOT / "params.yaml")
    dm = build_small_model(read_group(params, "model.small", SmallModelConfig), seed=0)
    taps = resolve_taps(dm.unet, "diff", dm.vae_stride)
    rng = np.random.default_rng(0)
    enc = root / "data" / "encoded"
    enc.mkdir(parents=True)
    frames, labels = [], {}
    for d in sorted(SPLITS):
        rows, labs = [], []
        for split, n in SPLITS[d].items():
            for i in range(n * scale):
                lab = street_label(rng, h, w)
                path = root / "labels" / d / f"{split}_{i:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(lab, mode="L").save(path)
                sha = hashlib.sha256(f"{d}{split}{i}".encode()).hexdigest()
                rows.append(
                    dict(
                        domain=d,
                        split=split,
                        image=str(path),
                        label=str(path),
                        sha256=sha,
                        height=h,
                        width=w,
                        row=len(rows),
                        canvas_h=h,
                        canvas_w=w,
                        content_h=h,
                        content_w=w,
                    )
                )
                labs.append(lab)
        frame = pd.DataFrame(rows)
        frames.append(frame)
        labels[d] = np.stack(labs)
        attrs = {
            "model_fingerprint": "benchmark",
            "resolution": [h, w],
            "images": index_fingerprint(frame["sha256"]),
            "encoding": {"draws": 1},
        }
        (enc / d).mkdir()
        create_rows_array(enc / d / LABELS_NAME, labels[d].shape, "uint8", attrs)[:] = labels[d]
    index = pd.concat(frames, ignore_index=True)
    index.to_parquet(enc / INDEX_NAME, index=False)
    write_prompts(Prompts(["plain"], [""], torch.zeros(1, 77, 8), "benchmark"), enc / PROMPTS_NAME)
    g = torch.Generator().manual_seed(0)
    proj = {tp.name: torch.randn(tp.channels, NUM_CLASSES, generator=g) for tp in taps}
    shapes = {tp.name: (tp.channels, h // tp.stride, w // tp.stride) for tp in taps}
    for t in timesteps:
        for d, frame in zip(sorted(SPLITS), frames, strict=True):
            ident = StoreIdentity(
                "benchmark",
                tuple(tp.name for tp in taps),
                tuple(tp.module_path for tp in taps),
                t,
                0,
                "add",
                "",
                "single",
                "{}",
                index_fingerprint(frame["sha256"]),
                size,
                ("",),
                1,
                "fp16",
                "fp32",
                "none",
            )
            store = FeatureStore.create(
                store_path(root / "data" / "features", t, d),
                ident,
                len(frame),
                shapes,
                {tp.name: tp.stride for tp in taps},
                params["extract"]["images_per_shard"],
            )
            for shard in range(store.n_shards):
                a, b = store.shard_range(shard)
                onehot = (
                    torch.nn.functional.one_hot(
                        torch.from_numpy(labels[d][a:b]).long(), NUM_CLASSES
                    )
                    .permute(0, 3, 1, 2)
                    .float()
                )
                out = {}
                for tp in taps:
                    pooled = torch.nn.functional.avg_pool2d(onehot, tp.stride)
                    x = torch.einsum("cn,bnhw->bchw", proj[tp.name], pooled)
                    x = x + NOISE[d] * torch.randn(x.shape, generator=g)
                    out[tp.name] = x[:, None].numpy().astype(np.float16)
                store.write_shard(shard, out)
    params["timesteps"] = list(timesteps)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return len(index)
