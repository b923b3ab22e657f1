"""Feature-store I/O: write MB/s, and read MB/s of the training loaders against raw file reads.

Two stores, both fp16 with the project's layout (one image per chunk, shards of images):
- `default`: real UNet features of the default small model (DIFF taps, 128x256, noised random
  latents) written by the extractor, 21 arrays of 4-100 KB chunks;
- `sd21`: the DIFF tap shapes of SD-2.1 at 1024x512 (56 MB per image), filled with random
  values (the real UNet at that size takes minutes per image on a CPU), 1-10 MB chunks.
Each is read four ways: raw sequential `read_bytes` of every file (the reference), the
per-sample FeatureDataset in a DataLoader (0 and 2 workers), and `preload` (what `train` uses),
once with the files in the page cache (best of --repeats) and once cold (page cache dropped
before each read; needs root, else skipped). MB/s count decoded feature bytes (10**6).

Usage: python benchmarks/store_io.py [--images 128] [--sd21-images 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from machine import machine_info  # this script's folder is on sys.path
from torch.utils.data import DataLoader

from pipeline.cache.encoded import Prompts
from pipeline.cache.preload import preload
from pipeline.cache.reader import FeatureDataset
from pipeline.cache.storage import parse_storage
from pipeline.cache.store import FeatureStore, StoreIdentity
from pipeline.core.params import load_params, read_group
from pipeline.diffusion.build import SmallModelConfig, build_small_model, sd21_unet
from pipeline.diffusion.taps import Tap, resolve_taps
from pipeline.diffusion.text import encode_text
from pipeline.loops.extract import ExtractConfig, Extractor, store_identity
from pipeline.loops.features import FeatureRecipe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "store_io.json"


def drop_page_cache() -> bool:
    """Empty the OS page cache (root only); False when not allowed."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def best_time(fn: Callable[[], None], repeats: int, cold: bool) -> float | None:
    """Best of `repeats` wall times; cold: page cache dropped before each (None if impossible)."""
    best = float("inf")
    for _ in range(repeats):
        if cold and not drop_page_cache():
            return None
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def write_default_store(path: Path, n: int) -> float:
    """Real features of the default small model; returns the seconds spent in write_shard."""
    params = load_params(ROOT / "params.yaml")
    model = build_small_model(read_group(params, "model.small", SmallModelConfig), seed=0)
    cfg = read_group(params, "extract", ExtractConfig)
    res = (128, 256)
    stride = model.vae_stride
    taps = resolve_taps(model.unet, cfg.taps, stride)
    with torch.no_grad():
        prompts = Prompts(["plain"], [""], encode_text(model, [""]), model.fingerprint)
    recipe = FeatureRecipe(taps, 50, cfg.noise_seed, cfg.noise_mode, 0, parse_storage(cfg.storage))
    ext = Extractor(model, recipe, prompts, cfg.draws)
    latents = torch.randn(n, 4, res[0] // stride, res[1] // stride)
    shas = [f"{i:064x}" for i in range(n)]
    identity = store_identity(
        model, taps, 50, prompts, pd.DataFrame({"sha256": shas}), res, cfg, "fp32"
    )
    store = create(path, identity, taps, res, n, cfg.images_per_shard)
    seconds = 0.0
    for shard in range(store.n_shards):
        s0, s1 = store.shard_range(shard)
        feats, scales = ext.batch(latents[s0:s1], shas[s0:s1])
        t0 = time.perf_counter()
        store.write_shard(shard, feats, scales)
        seconds += time.perf_counter() - t0
    return seconds


def write_sd21_store(path: Path, n: int, images_per_shard: int) -> float:
    """SD-2.1 DIFF tap shapes at 1024x512, random values; returns the write_shard seconds."""
    taps = resolve_taps(sd21_unet("meta"), "diff", 8)
    res = (512, 1024)
    identity = StoreIdentity(
        "sd21-shapes", tuple(t.name for t in taps), tuple(t.module_path for t in taps), 50, 0,
        "add", 0, "random", res, ("",), 1, "fp16", "bf16",
    )  # fmt: skip
    store = create(path, identity, taps, res, n, images_per_shard)
    rng = np.random.default_rng(0)
    seconds = 0.0
    for shard in range(store.n_shards):
        s0, s1 = store.shard_range(shard)
        feats = {
            t.name: rng.standard_normal(
                (s1 - s0, 1, *store.stored_shape(t.name)), np.float32
            ).astype(np.float16)
            for t in taps
        }
        t0 = time.perf_counter()
        store.write_shard(shard, feats)
        seconds += time.perf_counter() - t0
    return seconds


def create(
    path: Path, identity: StoreIdentity, taps: list[Tap], res: tuple[int, int], n: int, ips: int
) -> FeatureStore:
    shapes = {t.name: (t.channels, res[0] // t.stride, res[1] // t.stride) for t in taps}
    return FeatureStore.create(path, identity, n, shapes, {t.name: t.stride for t in taps}, ips)


def measure(path: Path, write_s: float, repeats: int) -> dict:
    """Write and read throughput of one store."""
    store = FeatureStore.open(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    on_disk = sum(p.stat().st_size for p in files)
    decoded = store.n_images * sum(2 * int(np.prod(store.stored_shape(t))) for t in store.taps)

    def raw() -> None:
        for p in files:
            p.read_bytes()

    def loader(workers: int) -> Callable[[], None]:
        def run() -> None:
            ds = FeatureDataset([path], labels=False, encoded_dir=path)
            for _ in DataLoader(ds, batch_size=2, num_workers=workers):
                pass

        return run

    def bulk() -> None:
        preload(FeatureDataset([path], labels=False, encoded_dir=path), progress=False)

    readers = {
        "raw_sequential": raw,
        "preload_blocks": bulk,
        "loader_0_workers": loader(0),
        "loader_2_workers": loader(2),
    }
    raw()  # warm
    read: dict[str, dict] = {}
    for cache in ("hot", "cold"):
        secs = {
            k: best_time(fn, repeats if cache == "hot" else 1, cache == "cold")
            for k, fn in readers.items()
        }
        if secs["raw_sequential"] is None:
            continue
        read[cache] = {
            k: {
                "seconds": round(s, 4),
                "decoded_MB_per_s": round(decoded / 1e6 / s, 1),
                "ratio_to_raw": round(secs["raw_sequential"] / s, 3),
            }
            for k, s in secs.items()
        }
    return {
        "images": store.n_images,
        "arrays": len(store.taps),
        "images_per_shard": store.images_per_shard,
        "decoded_MB": round(decoded / 1e6, 2),
        "on_disk_over_decoded": round(on_disk / decoded, 3),
        "write_decoded_MB_per_s": round(decoded / 1e6 / write_s, 1),
        "read": read,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--sd21-images", type=int, default=8)
    ap.add_argument("--sd21-images-per-shard", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "default"
        results["default"] = measure(path, write_default_store(path, args.images), args.repeats)
        path = Path(tmp) / "sd21"
        seconds = write_sd21_store(path, args.sd21_images, args.sd21_images_per_shard)
        results["sd21"] = measure(path, seconds, args.repeats)
    out = {"machine": machine_info(), "settings": vars(args), **results, "target_ratio": 0.7}
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
