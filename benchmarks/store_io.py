"""Feature-store I/O: compression per storage mode, write MB/s, and the loader's cold and hot
read MB/s against raw sequential reads of the same files, repeated, with medians and spreads.

Stores, all with the project's layout (one image-variant per chunk, shards of images):
- `default`: real UNet features of the default small model (DIFF taps, 128x256, noised random
  latents), 21 arrays of 4-100 KB chunks, per compression, with and without checksums;
- `sd21`: DIFF's tap shapes of SD-2.1 at 1024x512 (56 MB per image in fp16), random values,
  1-10 MB chunks;
- `diff_recipe`: crop draws of 512x512 at SD-2.1's tap shapes (one timestep's store per mode:
  fp16, int8, pca-64, pca-64-int8), read as DIFF's recipe reads them (the finecoder's taps).
Readers: `raw` reads every file whole in order (the reference); `loader` is FeatureReader
(what train and evaluate stream from) at the default `loader.read_threads`, rows in order
(evaluate, a preload) and in a random order (training streamed); a thread sweep beside it;
`per_chunk_read` one `FeatureStore.read` per tap and row (what a small sample's row cost before
`read_row`).
Cold: page cache dropped before each read (root only; else the run stops); every figure is the
median of --repeats rounds, with the min and max. The compression table measures real
features' chunks in memory: bytes kept and one core's encode/decode MB/s.

DIFF's recipe: samples/s the loader delivers for 9 timesteps (one store measured, its rate
divided by 9) against what one H100 consumes at 40 % of its bf16 dense peak, derived from the
head's counted FLOPs (forward x 3 for forward + backward): labelled derived.

The check (exit 1, nothing written): every reader returns the values written.

Usage: python benchmarks/store_io.py [--images 512] [--sd21-images 16] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numcodecs
import numpy as np
import torch
import yaml
from flops import H100_BF16_DENSE_TFLOPS, count  # this script's folder is on sys.path

from pipeline.cache.encoded import Prompts
from pipeline.cache.preload import LoaderConfig
from pipeline.cache.reader import FeatureReader
from pipeline.cache.storage import parse_storage
from pipeline.cache.store import FeatureStore, StoreIdentity
from pipeline.core.names import FeatureKey
from pipeline.core.params import load_params, read_group
from pipeline.data.samples import to_device
from pipeline.diffusion.build import SmallModelConfig, build_small_model, sd21_unet
from pipeline.diffusion.taps import Tap, resolve_taps
from pipeline.diffusion.text import encode_text
from pipeline.extraction.extractor import Extractor
from pipeline.extraction.noise import noise_mode
from pipeline.extraction.recipe import FeatureRecipe
from pipeline.loops.train import TrainConfig, build_model, diff_inputs
from pipeline.reporting.machine import Run, drop_page_cache

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "store_io.json"
PARAMS = load_params(ROOT / "params.yaml")
THREADS = read_group(PARAMS, "loader", LoaderConfig).read_threads  # the default
CODECS = {  # what storage.chunk_codecs writes, as numcodecs for the in-memory table
    "none": None,
    "lz4": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE),
    "zstd": numcodecs.Zstd(1),
}


def spread(seconds: list[float], mb: float) -> dict:
    """MB/s of the median round, with the slowest and fastest rounds."""
    med = statistics.median(seconds)
    return {
        "MB_per_s": round(mb / med),
        "min_MB_per_s": round(mb / max(seconds)),
        "max_MB_per_s": round(mb / min(seconds)),
    }


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
        model,
        FeatureRecipe(taps, 50, 0, noise_mode("add"), "single", parse_storage("fp16")),
        prompts,
    )
    s = model.vae_stride
    latents = torch.randn(n, 1, 4, 128 // s, 256 // s, generator=torch.Generator().manual_seed(0))
    parts = [ext.batch({"plain": latents[i : i + 16]})[0] for i in range(0, n, 16)]
    return taps, {t.name: np.concatenate([p[t.name] for p in parts]) for t in taps}


def as_mode(feats: dict[str, np.ndarray], storage: str) -> tuple[dict, dict | None]:
    """fp16 features (n, 1, C, h, w) per tap in another storage mode: ({"values" or a part:
    {tap: (n, 1, ...)}}, the projections it fitted or None)."""
    mode = parse_storage(storage)

    def pixels() -> dict[str, np.ndarray]:
        out = {}
        for k, x in feats.items():
            pix = x[:, 0].astype(np.float32).transpose(0, 2, 3, 1).reshape(-1, x.shape[2])
            out[k] = pix[:: max(1, len(pix) // 20000)]
        return out

    proj = mode.fit(pixels)
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for k, x in feats.items():
        stored = mode.reduce(torch.from_numpy(x[:, 0]).float(), proj[k] if proj else None)
        for name, a in stored.items():
            arrays.setdefault(name, {})[k] = a.numpy()[:, None]
    return arrays, proj


def compression_table(feats: dict[str, np.ndarray], modes: list[str]) -> dict:
    """Per storage mode and compressor: share of bytes kept, encode and decode MB/s (one core)."""
    table = {}
    for storage in modes:
        values = as_mode(feats, storage)[0]["values"]
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
) -> tuple[float, np.ndarray]:
    """A complete store of `feats` (fp16, converted to `storage`): the write_shard seconds, and
    the first image's first tap as a reader must return it (de-quantised where int8)."""
    arrays, proj = as_mode(feats, storage)
    values = arrays["values"]
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
        part = {name: {k: v[s0:s1] for k, v in a.items()} for name, a in arrays.items()}
        t0 = time.perf_counter()
        store.write_shard(shard, part.pop("values"), **part)
        seconds += time.perf_counter() - t0
    tap = taps[0].name
    mode = parse_storage(storage)
    first = mode.decode_parts(
        values[tap][0, 0], {n: a[tap][0, 0] for n, a in arrays.items() if n != "values"}
    )
    return seconds, first


def measure(
    run: Run, path: Path, written: tuple[float, np.ndarray], repeats: int, threads: tuple[int, ...]
) -> dict:
    """Write MB/s; per cache state (cold, hot) the read MB/s of raw and of each reader, each
    round the readers in turn; the ratio of medians to raw."""
    write_s, want = written
    store = FeatureStore.open(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    on_disk = sum(p.stat().st_size for p in files)
    decoded = store.n_images * sum(
        store.storage.dtype.itemsize * int(np.prod(store.stored_shape(t))) for t in store.taps
    )
    order = np.random.default_rng(0).permutation(store.n_images).tolist()

    def raw() -> None:
        for p in files:
            p.read_bytes()

    def loader(n_threads: int, rows: list[int]) -> Callable[[], None]:
        reader = FeatureReader(
            [path], encoded_dir=path, set_name="", labels=False, threads=n_threads
        )
        reader.open()  # the stores' metadata, as a training process has it open

        def read() -> None:
            for i in rows:
                reader.features(i)

        return read

    first = FeatureReader([path], encoded_dir=path, set_name="", labels=False).features(0)
    tap = store.taps[0]
    want = store.read(tap, 0)
    got = to_device(first, "cpu")[f"t{store.identity.timestep}/{tap}"]  # int8: decoded here
    run.check(
        np.array_equal(got.numpy(), want),
        f"{path.name}: the loader reads other values than the store holds",
    )
    chunked = FeatureStore.open(path)

    def per_chunk() -> None:  # a row as one `read` per tap (the loader's path before read_row)
        for i in range(chunked.n_images):
            {t: torch.from_numpy(chunked.read(t, i)) for t in chunked.taps}

    readers = {
        "raw": raw,
        "loader": loader(THREADS, list(range(store.n_images))),
        "loader_random_order": loader(THREADS, order),
        "per_chunk_read": per_chunk,
    }
    readers |= {f"loader_t{n}": loader(n, list(range(store.n_images))) for n in threads}
    out = {}
    for cache in ("cold", "hot"):
        secs: dict[str, list[float]] = {k: [] for k in readers}
        raw()  # warm (for hot)
        for _ in range(repeats):
            for k, fn in readers.items():
                if cache == "cold":
                    drop_page_cache()
                t0 = time.perf_counter()
                fn()
                secs[k].append(time.perf_counter() - t0)
        raw_med = statistics.median(secs["raw"])
        out[cache] = {
            k: {
                **spread(v, decoded / 1e6),
                "ratio_to_raw": round(raw_med / statistics.median(v), 3),
                "ratio_min_max": [round(raw_med / max(v), 3), round(raw_med / min(v), 3)],
            }
            for k, v in secs.items()
        }
    return {
        "images": store.n_images,
        "decoded_MB": round(decoded / 1e6, 2),
        "MB_per_sample": round(decoded / store.n_images / 1e6, 3),
        "on_disk_over_decoded": round(on_disk / decoded, 3),
        "write_MB_per_s": round(decoded / 1e6 / write_s),
        "default_read_threads": THREADS,
        "read": out,
    }


def diff_recipe_head() -> float:
    """GFLOP of one forward of DIFF's recipe head on a 512x512 crop (9 timesteps, SD-2.1 taps)."""
    recipe = yaml.safe_load((ROOT / "recipes" / "diff-gta2cs.yaml").read_text())
    cfg = read_group(
        {**PARAMS, "train": {**PARAMS["train"], **recipe["train"]}}, "train", TrainConfig
    )
    taps = resolve_taps(sd21_unet("meta"), "diff", 8)
    specs = {
        str(FeatureKey(t, tap.name)): (tap.channels, tap.stride)
        for t in recipe["timesteps"]
        for tap in taps
    }
    specs = diff_inputs(cfg, specs)
    with torch.device("meta"), torch.no_grad():
        head = build_model(cfg, specs)
        feats = {k: torch.zeros(1, c, 512 // s, 512 // s) for k, (c, s) in specs.items()}
        return count(lambda: head(feats)) / 1e9


def sd21_features(res: tuple[int, int], n: int, seed: int) -> tuple[list[Tap], dict]:
    """Random fp16 features (n, 1, C, h, w) of SD-2.1's DIFF taps at `res`."""
    taps = resolve_taps(sd21_unet("meta"), "diff", 8)
    rng = np.random.default_rng(seed)
    shape = lambda t: (n, 1, t.channels, res[0] // t.stride, res[1] // t.stride)  # noqa: E731
    return taps, {
        t.name: rng.standard_normal(shape(t), np.float32).astype(np.float16) for t in taps
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 512 of the default's 273 KB samples: a cold round of ~0.4 s (at 128, rounds of 0.1 s
    # were as much scheduler noise as reading: ratios 0.23-1.11 on an idle machine).
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--sd21-images", type=int, default=16)  # 900 MB a round
    ap.add_argument("--sd21-images-per-shard", type=int, default=4)
    ap.add_argument("--crop-draws", type=int, default=8, help="draws per DIFF-recipe store")
    # 15: SD-2.1's raw cold read varies ±30 % from round to round on the 2-core VM's disk.
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 8])
    args = ap.parse_args()
    run = Run()
    try:
        drop_page_cache()
    except OSError:
        run.fail("cold reads need root (to drop the page cache)")
    torch.set_num_threads(1)
    threads = tuple(args.threads)
    taps, feats = default_features(args.images)
    out: dict = {"settings": vars(args)}
    out["compression"] = compression_table(feats, ["fp16", "int8", "pca-8"])
    out["default"], out["sd21"], modes = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for compression, checksum in [("none", True), ("none", False), ("lz4", True)]:
            name = f"fp16-{compression}" + ("" if checksum else "-nocrc")
            path = Path(tmp) / f"default-{name}"
            sec = write_store(path, taps, (128, 256), feats, "fp16", compression, checksum, 16)
            out["default"][name] = measure(run, path, sec, args.repeats, threads)
            print(
                "default",
                name,
                json.dumps(out["default"][name]["read"]["cold"]["loader"]),
                flush=True,
            )
            shutil.rmtree(path)
        sd_taps, sd_feats = sd21_features((512, 1024), args.sd21_images, 0)
        path = Path(tmp) / "sd21-fp16"
        sec = write_store(
            path, sd_taps, (512, 1024), sd_feats, "fp16", "none", True, args.sd21_images_per_shard
        )
        out["sd21"]["fp16-none"] = measure(run, path, sec, args.repeats, threads)
        print("sd21", json.dumps(out["sd21"]["fp16-none"]["read"]["cold"]["loader"]), flush=True)
        shutil.rmtree(path)
        del sd_feats
        # DIFF's recipe: crop draws of 512x512, the finecoder's taps (strides 8-32), per mode.
        crop_taps, crop_feats = sd21_features((512, 512), args.crop_draws, 1)
        read_taps = [t for t in crop_taps if t.stride <= 32]
        crop_feats = {t.name: crop_feats[t.name] for t in read_taps}
        for storage in ("fp16", "int8", "pca-64", "pca-64-int8"):
            path = Path(tmp) / f"crops-{storage}"
            sec = write_store(path, read_taps, (512, 512), crop_feats, storage, "none", True, 4)
            modes[storage] = measure(run, path, sec, args.repeats, ())
            print(
                "crops", storage, json.dumps(modes[storage]["read"]["cold"]["loader"]), flush=True
            )
            shutil.rmtree(path)
    gflop = diff_recipe_head()
    gpu_samples = 0.4 * H100_BF16_DENSE_TFLOPS * 1e3 / (3 * gflop)
    recipe: dict = {
        "timesteps": 9,
        "head_forward_gflop_512_crop": round(gflop, 1),
        "derived_h100_samples_per_s_at_40pct": round(gpu_samples, 1),
        "note": "samples/s for 9 timesteps = one timestep's store measured / 9; the H100 rate "
        "is derived from counted FLOPs, not measured",
        "modes": {},
    }
    for storage, m in modes.items():
        mb = 9 * m["MB_per_sample"]
        row = {"MB_per_sample_9_timesteps": round(mb, 1)}
        for order in ("loader", "loader_random_order"):
            rate = m["read"]["cold"][order]["MB_per_s"] / mb
            row[f"samples_per_s_cold_{order.removeprefix('loader').strip('_') or 'in_order'}"] = (
                round(rate, 2)
            )
        row["derived_h100_needs_MB_per_s"] = round(gpu_samples * mb)
        recipe["modes"][storage] = row
    out["diff_recipe"] = recipe
    for name, store in {**out["default"], **out["sd21"]}.items():
        run.check(store["read"]["cold"]["raw"]["MB_per_s"] > 0, name)
    print(json.dumps(run.write(RESULTS, out)["diff_recipe"], indent=2))


if __name__ == "__main__":
    main()
