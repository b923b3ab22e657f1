"""Feature-store I/O: compression per storage mode, write MB/s, and the loader's read MB/s against
raw sequential reads of the same files, cold and hot, with and without per-chunk checksums.

Stores, all with the project's layout (one image-variant per chunk, shards of images):
- `default`: real UNet features of the default small model (DIFF taps, 128x256, noised random
  latents), 21 arrays of 4-100 KB chunks, written once per compression / checksum choice;
- `sd21`: the DIFF tap shapes of SD-2.1 at 1024x512 (56 MB per image in fp16), random values
  (the real UNet at that size takes minutes per image on a CPU), 1-10 MB chunks; in fp16,
  int8 and pca-64 for the samples/s of DIFF's recipe.
Readers: `raw` reads every file whole in order (the reference); `loader tN` is the per-sample
FeatureDataset (what train and evaluate stream from) with N reader threads, in one process.
Cold: page cache dropped before each read (root only, else skipped); hot: best of --repeats.
MB/s count decoded feature bytes (10**6). The compression table measures real features'
chunks in memory: bytes kept and one core's encode/decode MB/s.

DIFF's recipe: samples/s the loader delivers (9 timesteps, the taps its finecoder reads, whole
chunks read for a 512x512 crop) against what one H100 would consume at 40 % of its bf16 dense
peak, from the head's counted FLOPs (forward x 3 for forward + backward).

Usage: python benchmarks/store_io.py [--images 128] [--sd21-images 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numcodecs
import numpy as np
import torch
import yaml
from flops import H100_BF16_DENSE_TFLOPS, count  # this script's folder is on sys.path
from machine import machine_info

from pipeline.cache.encoded import Prompts
from pipeline.cache.reader import FeatureDataset
from pipeline.cache.storage import fit_pca, parse_storage, quantize_int8
from pipeline.cache.store import FeatureStore, StoreIdentity
from pipeline.core.names import FeatureKey
from pipeline.core.params import load_params, read_group
from pipeline.diffusion.build import SmallModelConfig, build_small_model, sd21_unet
from pipeline.diffusion.taps import Tap, resolve_taps
from pipeline.diffusion.text import encode_text
from pipeline.loops.extract import Extractor
from pipeline.loops.features import FeatureRecipe
from pipeline.loops.train import TrainConfig, build_model, diff_inputs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "store_io.json"
PARAMS = load_params(ROOT / "params.yaml")
CODECS = {  # what storage.chunk_codecs writes, as numcodecs for the in-memory table
    "none": None,
    "lz4": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE),
    "zstd": numcodecs.Zstd(1),
}


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


def identity(
    taps: list[Tap], res: tuple[int, int], storage: str, compression: str
) -> StoreIdentity:
    return StoreIdentity(
        "benchmark",
        tuple(t.name for t in taps),
        tuple(t.module_path for t in taps),
        50,
        0,
        "add",
        "",
        "single",
        "{}",
        "benchmark",
        res,
        ("",),
        1,
        storage,
        "fp32",
        compression,
    )


def default_features(n: int) -> tuple[list[Tap], dict[str, np.ndarray]]:
    """Real fp16 features (n, 1, C, h, w) per tap of the default small model at 128x256."""
    model = build_small_model(read_group(PARAMS, "model.small", SmallModelConfig), seed=0)
    taps = resolve_taps(model.unet, "diff", model.vae_stride)
    with torch.no_grad():
        prompts = Prompts(["plain"], [""], encode_text(model, [""]), model.fingerprint)
    ext = Extractor(
        model, FeatureRecipe(taps, 50, 0, "add", "single", parse_storage("fp16")), prompts, 1
    )
    s = model.vae_stride
    latents = torch.randn(n, 1, 4, 128 // s, 256 // s, generator=torch.Generator().manual_seed(0))
    parts = [ext.batch({"plain": latents[i : i + 16]})[0] for i in range(0, n, 16)]
    return taps, {t.name: np.concatenate([p[t.name] for p in parts]) for t in taps}


def as_mode(feats: dict[str, np.ndarray], storage: str) -> tuple[dict, dict | None, dict | None]:
    """fp16 features in another storage mode: (values, int8 scales, PCA projections)."""
    mode = parse_storage(storage)
    if mode.kind == "fp16":
        return feats, None, None
    if mode.kind == "int8":
        q = {k: quantize_int8(torch.from_numpy(x[:, 0]).float()) for k, x in feats.items()}
        return (
            {k: v.numpy()[:, None] for k, (v, _) in q.items()},
            {k: s.numpy()[:, None] for k, (_, s) in q.items()},
            None,
        )
    values, proj = {}, {}
    for k, x in feats.items():
        c = x.shape[2]
        pix = x[:, 0].astype(np.float32).transpose(0, 2, 3, 1).reshape(-1, c)
        comp, mean = fit_pca(pix[:: max(1, len(pix) // 20000)], mode.k)
        y = np.einsum("kc,nchw->nkhw", comp, x[:, 0].astype(np.float32) - mean[:, None, None])
        values[k], proj[k] = y[:, None].astype(np.float16), (comp, mean)
    return values, None, proj


def compression_table(feats: dict[str, np.ndarray], modes: list[str]) -> dict:
    """Per storage mode and compressor: share of bytes kept, encode and decode MB/s (one core)."""
    table = {}
    for storage in modes:
        values, _, _ = as_mode(feats, storage)
        chunks = [np.ascontiguousarray(x[i, 0]) for x in values.values() for i in range(len(x))]
        raw = sum(c.nbytes for c in chunks)
        table[storage] = {}
        for name, codec in CODECS.items():
            if codec is None:
                table[storage][name] = {"kept": 1.0}
                continue
            t0 = time.perf_counter()
            enc = [codec.encode(c) for c in chunks]
            t_enc = time.perf_counter() - t0
            t0 = time.perf_counter()
            for e, c in zip(enc, chunks, strict=True):
                codec.decode(e, out=np.empty_like(c))
            t_dec = time.perf_counter() - t0
            table[storage][name] = {
                "kept": round(sum(len(e) for e in enc) / raw, 3),
                "encode_MB_per_s": round(raw / 1e6 / t_enc),
                "decode_MB_per_s": round(raw / 1e6 / t_dec),
            }
    return table


def write_store(
    path: Path,
    taps: list[Tap],
    res: tuple[int, int],
    feats: dict[str, np.ndarray],
    storage: str,
    compression: str,
    checksum: bool,
    ips: int,
) -> float:
    """A complete store of `feats` (fp16, converted to `storage`); the write_shard seconds."""
    values, scales, proj = as_mode(feats, storage)
    n = len(next(iter(values.values())))
    shapes = {t.name: (t.channels, res[0] // t.stride, res[1] // t.stride) for t in taps}
    store = FeatureStore.create(
        path,
        identity(taps, res, storage, compression),
        n,
        shapes,
        {t.name: t.stride for t in taps},
        ips,
        proj,
        checksum,
    )
    seconds = 0.0
    for shard in range(store.n_shards):
        s0, s1 = store.shard_range(shard)
        part = {k: v[s0:s1] for k, v in values.items()}
        sc = None if scales is None else {k: v[s0:s1] for k, v in scales.items()}
        t0 = time.perf_counter()
        store.write_shard(shard, part, sc)
        seconds += time.perf_counter() - t0
    return seconds


def measure(path: Path, write_s: float, repeats: int, threads: tuple[int, ...]) -> dict:
    """Write MB/s, and read MB/s and ratio to raw of each reader, hot and cold."""
    store = FeatureStore.open(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    on_disk = sum(p.stat().st_size for p in files)
    decoded = store.n_images * sum(
        store.storage.dtype.itemsize * int(np.prod(store.stored_shape(t))) for t in store.taps
    )

    def raw() -> None:
        for p in files:
            p.read_bytes()

    def loader(n_threads: int) -> Callable[[], None]:
        def run() -> None:
            ds = FeatureDataset(
                [path], labels=False, encoded_dir=path, domain="", threads=n_threads
            )
            for i in range(len(ds)):
                ds[i]

        return run

    readers = {"raw": raw, **{f"loader_t{n}": loader(n) for n in threads}}
    raw()  # warm
    read: dict[str, dict] = {}
    for cache in ("hot", "cold"):
        secs = {
            k: best_time(fn, repeats if cache == "hot" else 1, cache == "cold")
            for k, fn in readers.items()
        }
        if secs["raw"] is None:
            continue
        read[cache] = {
            k: {"MB_per_s": round(decoded / 1e6 / s), "ratio_to_raw": round(secs["raw"] / s, 3)}
            for k, s in secs.items()
        }
    return {
        "images": store.n_images,
        "decoded_MB": round(decoded / 1e6, 2),
        "on_disk_over_decoded": round(on_disk / decoded, 3),
        "write_MB_per_s": round(decoded / 1e6 / write_s),
        "read": read,
    }


def diff_recipe_head() -> tuple[float, dict[str, int]]:
    """GFLOP of one forward of DIFF's recipe head on a 512x512 crop (9 timesteps, SD-2.1 taps),
    and the stored bytes per sample per storage mode (whole chunks: 1024x512 images)."""
    recipe = yaml.safe_load((ROOT / "recipes" / "diff-gta2cs.yaml").read_text())
    cfg = read_group(
        {**PARAMS, "train": {**PARAMS["train"], **recipe["train"]}}, "train", TrainConfig
    )
    taps = resolve_taps(sd21_unet("meta"), "diff", 8)
    timesteps = recipe["timesteps"]
    specs = {
        str(FeatureKey(t, tap.name)): (tap.channels, tap.stride) for t in timesteps for tap in taps
    }
    specs = diff_inputs(cfg, specs)
    with torch.device("meta"), torch.no_grad():
        head = build_model(cfg, specs)
        feats = {k: torch.zeros(1, c, 512 // s, 512 // s) for k, (c, s) in specs.items()}
        flop = count(lambda: head(feats))
    pixels = [(c, (512 // s) * (1024 // s)) for c, s in specs.values()]
    per_sample = {
        "fp16": sum(2 * c * n for c, n in pixels),
        "int8": sum(c * n + 4 * c for c, n in pixels),
        "pca-64": sum(2 * 64 * n for _, n in pixels),
    }
    return flop / 1e9, per_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--sd21-images", type=int, default=8)
    ap.add_argument("--sd21-images-per-shard", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    torch.set_num_threads(1)
    threads = tuple(args.threads)
    taps, feats = default_features(args.images)
    out: dict = {"machine": machine_info(), "settings": vars(args)}
    out["compression"] = compression_table(feats, ["fp16", "int8", "pca-8"])
    sd_taps = resolve_taps(sd21_unet("meta"), "diff", 8)
    sd_res = (512, 1024)
    rng = np.random.default_rng(0)
    n = args.sd21_images
    sd_feats = {
        t.name: rng.standard_normal(
            (n, 1, t.channels, 512 // t.stride, 1024 // t.stride), np.float32
        ).astype(np.float16)
        for t in sd_taps
    }
    out["default"], out["sd21"] = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for compression, checksum in [
            ("none", True),
            ("none", False),
            ("lz4", True),
            ("lz4", False),
            ("zstd", True),
        ]:
            name = f"fp16-{compression}" + ("" if checksum else "-nocrc")
            path = Path(tmp) / f"default-{name}"
            sec = write_store(path, taps, (128, 256), feats, "fp16", compression, checksum, 16)
            out["default"][name] = measure(path, sec, args.repeats, threads)
            print(name, json.dumps(out["default"][name]), flush=True)
        for storage, checksum in [
            ("fp16", True),
            ("fp16", False),
            ("int8", True),
            ("pca-64", True),
        ]:
            name = f"{storage}-none" + ("" if checksum else "-nocrc")
            path = Path(tmp) / f"sd21-{name}"
            sec = write_store(
                path,
                sd_taps,
                sd_res,
                sd_feats,
                storage,
                "none",
                checksum,
                args.sd21_images_per_shard,
            )
            out["sd21"][name] = measure(path, sec, args.repeats, threads)
            print(name, json.dumps(out["sd21"][name]), flush=True)
            shutil.rmtree(path)
    gflop, per_sample = diff_recipe_head()
    gpu_samples = 0.4 * H100_BF16_DENSE_TFLOPS * 1e3 / (3 * gflop)
    recipe: dict = {
        "head_forward_gflop_512_crop": round(gflop, 1),
        "h100_samples_per_s_at_40pct": round(gpu_samples, 1),
        "modes": {},
    }
    for storage, mb in per_sample.items():
        key = f"{storage}-none"
        cold = out["sd21"][key]["read"].get("cold") or out["sd21"][key]["read"]["hot"]
        best = max((k for k in cold if k != "raw"), key=lambda k: cold[k]["MB_per_s"])
        delivered = cold[best]["MB_per_s"] / (mb / 1e6)
        recipe["modes"][storage] = {
            "MB_per_sample": round(mb / 1e6, 1),
            "loader_samples_per_s": round(delivered, 2),
            "with": best,
            "needed_MB_per_s": round(gpu_samples * mb / 1e6),
            "keeps_up": delivered >= gpu_samples,
        }
    out["diff_recipe"] = recipe
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
