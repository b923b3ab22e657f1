"""One training iteration from the feature cache vs the same iteration computing features online.

Online = what DIFF does every step: VAE-encode the batch, noise it, one UNet pass per timestep
with the DIFF taps, then the fusion + head step. Cached = read the same features from a real
on-disk store (fp16 Zarr, the reader), then the same step. Default small model, 128x256 images.
Also measures the peak RSS of the train and evaluate stages at the default size on a synthetic
store with the default model's real tap shapes (--stages).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from machine import machine_info  # this script's folder is on sys.path

from pipeline.cache.encoded import index_fingerprint
from pipeline.cache.preload import preload
from pipeline.cache.reader import FeatureDataset
from pipeline.cache.store import FeatureStore, StoreIdentity
from pipeline.core.names import FeatureKey
from pipeline.core.params import read_group
from pipeline.diffusion.build import SmallModelConfig, build_small_model
from pipeline.diffusion.features import unet_features
from pipeline.diffusion.model import encode_images
from pipeline.diffusion.noising import add_noise
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.text import encode_text
from pipeline.loops.train import TrainConfig, augment, build_model

ROOT = Path(__file__).resolve().parents[1]


def step(model, opt, feats, label) -> float:
    logits = model(feats)
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, label, ignore_index=255)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def bench_iteration(repeats: int, timesteps: list[int], size: tuple[int, int]) -> dict:
    """Seconds per training iteration at the params.yaml train defaults (batch, crop, head)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = read_group(params, "train", TrainConfig)
    crop = tuple(cfg.crop) if cfg.crop else size
    batch = cfg.batch_size
    torch.manual_seed(0)
    dm = build_small_model(read_group(params, "model.small", SmallModelConfig), seed=0)
    taps = resolve_taps(dm.unet, "diff")
    with torch.no_grad():
        prompt = encode_text(dm, [""])
    n = batch * 2
    images = torch.rand(n, 3, *size) * 2 - 1
    shas = [f"{i:064x}" for i in range(n)]
    label = torch.randint(0, 19, (batch, *crop))
    full = torch.randint(0, 19, size)

    def online_features(imgs: torch.Tensor, rows: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            lat = encode_images(dm, imgs, None)
            out = {}
            for t in timesteps:
                noisy = add_noise(dm, lat, t, rows, 0)
                for name, x in unet_features(dm, noisy, t, prompt, taps).items():
                    out[str(FeatureKey(t, name))] = x.float()
        return out

    # A real store of these images' features, written as extract writes it (fp16, sharded).
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    paths = []
    all_feats = online_features(images, shas)
    for t in timesteps:
        ident = StoreIdentity(
            model_fingerprint="bench", taps=tuple(tp.name for tp in taps),
            tap_modules=tuple(tp.module_path for tp in taps), timestep=t, noise_seed=0,
            noise_mode="add", inversion_steps=0, images=index_fingerprint(shas), resolution=size,
            prompts=("",), draws=1, storage="fp16", compute_dtype="fp32",
        )  # fmt: skip
        shapes = {tp.name: tuple(all_feats[str(FeatureKey(t, tp.name))].shape[1:]) for tp in taps}
        strides = {tp.name: tp.stride for tp in taps}
        FeatureStore.create(tmp / f"t{t}", ident, n, shapes, strides, batch)
        store = FeatureStore.open(tmp / f"t{t}", mode="r+")
        for shard in range(store.n_shards):
            a, b = store.shard_range(shard)
            feats = {tp.name: all_feats[str(FeatureKey(t, tp.name))][a:b, None] for tp in taps}
            store.write_shard(shard, {k: v.numpy() for k, v in feats.items()})
        paths.append(tmp / f"t{t}")
    specs = {k: (v.shape[1], size[0] // v.shape[2]) for k, v in all_feats.items()}
    zarr_ds = FeatureDataset(paths, labels=False, encoded_dir=tmp)
    ram_ds = preload(FeatureDataset(paths, labels=False, encoded_dir=tmp), progress=False)
    model = build_model(cfg, specs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def batch_of(samples: list[dict]) -> dict[str, torch.Tensor]:
        # Stored precision (float16) in, float32 to the model: the cast the trainer makes.
        return {k: torch.stack([s["features"][k] for s in samples]).float() for k in specs}

    def cached_ram() -> None:  # what stages/train.py does: preloaded split, crop in memory
        samples = [
            augment({**ram_ds[i], "label": full}, cfg.crop, 0, 0, False) for i in range(batch)
        ]
        step(model, opt, batch_of(samples), label)

    def cached_zarr() -> None:  # per-sample reads from the zarr store, crop in memory
        samples = [
            augment({**zarr_ds[i], "label": full}, cfg.crop, 0, 0, False) for i in range(batch)
        ]
        step(model, opt, batch_of(samples), label)

    def online() -> None:  # DIFF: VAE + noise + UNet per timestep on the crop, every iteration
        imgs = images[:batch, :, : crop[0], : crop[1]]
        step(model, opt, online_features(imgs, shas[:batch]), label)

    def fetch_ram() -> None:  # feature acquisition only, from the preloaded store
        batch_of(
            [augment({**ram_ds[i], "label": full}, cfg.crop, 0, 0, False) for i in range(batch)]
        )

    def fetch_online() -> None:  # feature acquisition only, online
        online_features(images[:batch, :, : crop[0], : crop[1]], shas[:batch])

    fns = {
        "cached_ram": cached_ram,
        "cached_zarr": cached_zarr,
        "online": online,
        "features_only_ram": fetch_ram,
        "features_only_online": fetch_online,
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats + 1):  # the first round is warm-up
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    files = [p for d in paths for p in d.rglob("*") if p.is_file()]
    return {
        "batch_size": batch,
        "image_size": list(size),
        "crop": list(crop),
        "fusion": cfg.fusion,
        "head": cfg.head,
        "timesteps": timesteps,
        "taps_per_timestep": len(taps),
        "s_per_iteration": {k: round(v, 4) for k, v in med.items()},
        "speedup_online_over_cached_ram": round(med["online"] / med["cached_ram"], 2),
        "speedup_online_over_cached_zarr": round(med["online"] / med["cached_zarr"], 2),
        "speedup_features_only": round(med["features_only_online"] / med["features_only_ram"], 1),
        "store_bytes_per_image_all_timesteps": int(sum(p.stat().st_size for p in files) / n),
        "times": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }


def bench_stages(timesteps: list[int], size: tuple[int, int]) -> dict:
    """Run stages/train.py and stages/evaluate.py at the default size; report time and peak RSS."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from default_size_project import make_project  # noqa: PLC0415

    root = Path(tempfile.mkdtemp(prefix="bench-project-"))
    make_project(root, timesteps, size)
    out = {}
    for name in ("train", "evaluate"):
        paths = {"train": ["data/encoded", "data/features", "data/heads", "metrics/train.json",
                           "plots/train"],
                 "evaluate": ["data/encoded", "data/features", "data/heads",
                              "metrics/evaluate.json", "plots/evaluate"]}[name]  # fmt: skip
        args = [sys.executable, "-c", _RSS_WRAPPER, str(ROOT / "stages" / f"{name}.py"), *paths,
                "--params", "params.yaml"]  # fmt: skip
        t0 = time.perf_counter()
        res = subprocess.run(args, cwd=root, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{res.stderr[-3000:]}")
        rss = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        out[name] = {"wall_s": round(wall, 1), "peak_rss_mb": rss}
    out["train_metrics"] = json.loads((root / "metrics" / "train.json").read_text())
    out["evaluate_mIoU"] = {
        d: s["mIoU"]
        for d, s in json.loads((root / "metrics" / "evaluate.json").read_text()).items()
    }
    return out


# Runs a stage script in-process, then prints the process's peak RSS as JSON (Linux: KiB).
_RSS_WRAPPER = (
    "import json,resource,runpy,sys; script=sys.argv[1]; sys.argv=sys.argv[1:]; "
    "runpy.run_path(script, run_name='__main__'); "
    "print(json.dumps({'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024,1)}))"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--timesteps", type=int, nargs="+", default=[50, 150])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (params train.threads)")
    ap.add_argument(
        "--stages", action="store_true", help="also time train/evaluate at default size"
    )
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "train_cached_vs_online.json")
    )
    args = ap.parse_args()
    size = (128, 256)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = {
        "machine": machine_info(),
        "iteration": bench_iteration(args.repeats, args.timesteps, size),
    }
    if args.stages:
        result["stages"] = bench_stages(args.timesteps, size)
    result["peak_rss_mb_benchmark"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result["iteration"].items() if k != "times"}, indent=2))
    if "stages" in result:
        print(json.dumps(result["stages"], indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
