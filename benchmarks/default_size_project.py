"""A project folder at the embedded default's size for timing train/evaluate without the UNet.

Real on-disk stores (fp16 Zarr v3, sharded) with the default small model's DIFF tap shapes, real
labels.zarr and index; feature values are a fixed random projection of the pooled label plus
domain-dependent noise, so heads learn something. The params groups train/evaluate are copied
from the project's params.yaml, so the defaults are what is timed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from pipeline.cache.encoded import INDEX_NAME, LABELS_NAME, create_rows_array, index_fingerprint
from pipeline.cache.store import FeatureStore, StoreIdentity
from pipeline.core.classes import NUM_CLASSES, colorize
from pipeline.core.params import load_params, read_group
from pipeline.diffusion.build import SmallModelConfig, build_small_model
from pipeline.diffusion.taps import resolve_taps

ROOT = Path(__file__).resolve().parents[1]
SPLITS = {"game": {"train": 400, "val": 80}, "real": {"val": 80}, "fog": {"val": 80},
          "night": {"val": 80}, "rain": {"val": 80}}  # fmt: skip
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


def make_project(root: Path, timesteps: list[int], size: tuple[int, int]) -> None:
    h, w = size
    params = load_params(ROOT / "params.yaml")
    dm = build_small_model(read_group(params, "model.small", SmallModelConfig), seed=0)
    taps = resolve_taps(dm.unet, "diff")
    rng = np.random.default_rng(0)
    rows, labels, noise = [], [], []
    for d in sorted(SPLITS):
        for split, n in SPLITS[d].items():
            for i in range(n):
                lab = street_label(rng, h, w)
                p = root / "images" / d / f"{split}_{i:05d}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(colorize(lab)).save(p)
                lp = p.with_name(f"{split}_{i:05d}_label.png")
                Image.fromarray(lab, mode="L").save(lp)
                sha = hashlib.sha256(f"{d}{split}{i}".encode()).hexdigest()
                rows.append(
                    dict(
                        domain=d,
                        split=split,
                        image=str(p),
                        label=str(p),
                        sha256=sha,
                        height=h,
                        width=w,
                    )
                )
                labels.append(lab)
                noise.append(NOISE[d])
    index = pd.DataFrame(rows)
    enc = root / "data" / "encoded"
    enc.mkdir(parents=True)
    index.to_parquet(enc / INDEX_NAME, index=False)
    arr = create_rows_array(enc / LABELS_NAME, (len(index), h, w), "uint8", {"resolution": [h, w]})
    arr[:] = np.stack(labels)
    g = torch.Generator().manual_seed(0)
    per_shard = 16
    for t in timesteps:
        ident = StoreIdentity(
            model_fingerprint="synthetic", taps=tuple(tp.name for tp in taps),
            tap_modules=tuple(tp.module_path for tp in taps), timestep=t, noise_seed=0,
            noise_mode="add", inversion_steps=0, images=index_fingerprint(index["sha256"]),
            resolution=size, prompts=("",), draws=1, storage="fp16", compute_dtype="fp32",
        )  # fmt: skip
        shapes = {tp.name: (tp.channels, h // tp.stride, w // tp.stride) for tp in taps}
        path = root / "data" / "features" / f"t{t}"
        FeatureStore.create(
            path, ident, len(index), shapes, {tp.name: tp.stride for tp in taps}, per_shard
        )
        store = FeatureStore.open(path, mode="r+")
        proj = {tp.name: torch.randn(tp.channels, NUM_CLASSES, generator=g) for tp in taps}
        for shard in range(store.n_shards):
            a, b = store.shard_range(shard)
            onehot = F.one_hot(torch.from_numpy(np.stack(labels[a:b])).long(), NUM_CLASSES)
            onehot = onehot.permute(0, 3, 1, 2).float()
            out = {}
            for tp in taps:
                x = torch.einsum("cn,bnhw->bchw", proj[tp.name], F.avg_pool2d(onehot, tp.stride))
                sigma = torch.tensor(noise[a:b])[:, None, None, None]
                x = x + sigma * torch.randn(x.shape, generator=g)
                out[tp.name] = x[:, None].numpy().astype(np.float16)
            store.write_shard(shard, out)
    params["timesteps"] = list(timesteps)
    params["encode"]["resolution"] = list(size)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
