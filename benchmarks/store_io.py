"""Feature-store I/O: write MB/s, and read MB/s of the training loaders against raw file reads.

Real UNet features (default small model, DIFF taps, 128x256, noised random latents) go through
the extractor into an fp16 store, one timed `write_shard` per shard. Then the same files are
read four ways: raw sequential `read_bytes` of every file (the ceiling), the per-sample
FeatureDataset in a DataLoader (0 and 2 workers), and `preload` (what `train` uses). The files
are in the page cache for every read (just written, then read once to warm), so the ratios
compare decoding and assembly costs, not the disk. MB are 10**6 bytes of files on disk.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from machine import machine_info  # this script's folder is on sys.path
from torch.utils.data import DataLoader

from pipeline.diffusion import SmallModelConfig, build_small_model, encode_prompts
from pipeline.extract import ExtractConfig, Extractor, store_identity
from pipeline.preload import preload
from pipeline.reader import FeatureDataset
from pipeline.store import FeatureStore
from pipeline.taps import resolve_taps

RESULTS = Path(__file__).resolve().parent / "results" / "store_io.json"


def file_bytes(root: Path) -> tuple[list[Path], int]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return files, sum(p.stat().st_size for p in files)


def timed(fn, repeats: int) -> float:
    """Best of `repeats` wall times (the CPU may be shared)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--storage", default="fp16", choices=["fp16", "int8"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = build_small_model(SmallModelConfig(), seed=0)
    cfg = ExtractConfig(storage=args.storage)
    res = (128, 256)
    stride = model.vae_stride
    taps = resolve_taps(model.unet, cfg.taps, stride)
    ext = Extractor(model, taps, 50, encode_prompts(model, [""]), cfg, [""])
    n = args.images
    latents = torch.randn(n, 4, res[0] // stride, res[1] // stride)
    shas = [f"{i:064x}" for i in range(n)]
    index = pd.DataFrame({"sha256": shas})
    identity = store_identity(model, taps, 50, [""], index, res, cfg, "fp32")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t50"
        shapes = {t.name: (t.channels, res[0] // t.stride, res[1] // t.stride) for t in taps}
        store = FeatureStore.create(
            path, identity, n, shapes, {t.name: t.stride for t in taps}, cfg.images_per_shard
        )
        write_s = 0.0
        for shard in range(store.n_shards):
            s0, s1 = store.shard_range(shard)
            feats, scales = ext.batch(latents[s0:s1], shas[s0:s1])
            t0 = time.perf_counter()
            store.write_shard(shard, feats, scales)
            write_s += time.perf_counter() - t0
        files, nbytes = file_bytes(path)
        decoded = n * sum(int(np.prod(store.stored_shape(t))) for t in store.taps) * 2
        mb = nbytes / 1e6

        def raw() -> None:
            for p in files:
                p.read_bytes()

        def loader(workers: int) -> None:
            ds = FeatureDataset([path], labels=False)
            dl = DataLoader(ds, batch_size=8, num_workers=workers)
            for _ in dl:
                pass

        def bulk() -> None:
            preload(FeatureDataset([path], labels=False), progress=False)

        raw()  # warm the page cache
        seconds = {
            "raw_sequential": timed(raw, args.repeats),
            "preload_blocks": timed(bulk, args.repeats),
            "loader_0_workers": timed(lambda: loader(0), args.repeats),
            "loader_2_workers": timed(lambda: loader(2), args.repeats),
        }
    read = {
        k: {
            "seconds": round(s, 4),
            "file_MB_per_s": round(mb / s, 1),
            "ratio_to_raw": round(seconds["raw_sequential"] / s, 4),
        }
        for k, s in seconds.items()
    }
    out = {
        "machine": machine_info(),
        "settings": {**vars(args), "resolution": list(res), "taps": cfg.taps, "files": len(files)},
        "store_MB_on_disk": round(mb, 2),
        "decoded_MB": round(decoded / 1e6, 2),
        "write": {"seconds": round(write_s, 4), "file_MB_per_s": round(mb / write_s, 1)},
        "read": read,
        "target_loader_ratio_to_raw": 0.7,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
