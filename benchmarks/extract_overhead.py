"""Extraction overhead and bytes per image per timestep of each storage mode.

1. The default small model (random init, the embedded default's architecture) at
   params encode.resolution: `extract_store` wall time (noising, hooks, reduction, compression,
   sharded writes, done mask) against bare VAE-encode + UNet forward passes on the same images.
2. Bytes per image per timestep for fp16 / int8 / pca-k: stored (uncompressed) from the real
   array shapes, and on disk (compressed) for the default model; for SD-2.1's `diff` taps at
   1024x512, from the UNet built on the meta device from SD-2.1's config (pipeline/diffusion/sd21).

Usage: python benchmarks/extract_overhead.py [--images 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from machine import machine_info  # this script's folder is on sys.path

from pipeline.cache.encoded import Prompts, create_rows_array
from pipeline.cache.storage import parse_storage
from pipeline.core.fileio import write_json
from pipeline.core.params import load_params, read_group
from pipeline.diffusion.build import SmallModelConfig, build_small_model, sd21_unet
from pipeline.diffusion.model import encode_images, save_diffusion_model
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.text import encode_text
from pipeline.loops.extract import DomainInputs, ExtractConfig, Extractor, extract_store
from pipeline.loops.features import FeatureRecipe

ROOT = Path(__file__).resolve().parents[1]
MODES = ("fp16", "int8", "pca-8", "pca-16")  # PCA below the default taps' 32 channels


def stored_bytes(taps: list, resolution: tuple[int, int], mode: str) -> int:
    """Bytes of one image-variant as stored (before compression), from the array shapes."""
    m = parse_storage(mode)
    total = 0
    for t in taps:
        hw = (resolution[0] // t.stride) * (resolution[1] // t.stride)
        c = min(m.k, t.channels) if m.kind == "pca" else t.channels
        total += c * hw * m.dtype.itemsize + (4 * c if m.kind == "int8" else 0)
    return total


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_passes(model, images: torch.Tensor, embeds: torch.Tensor, t: int, batch: int, device: str):
    """Seconds of VAE encode and of full UNet forward passes, batch by batch, nothing stored."""
    vae_s = unet_s = 0.0
    ts = torch.full((batch,), t, dtype=torch.long, device=device)
    with torch.inference_mode():
        for b0 in range(0, images.shape[0], batch):
            x = images[b0 : b0 + batch].to(device)
            sync(device)
            t0 = time.perf_counter()
            z = encode_images(model, x)
            sync(device)
            t1 = time.perf_counter()
            noisy = model.scheduler.add_noise(z, torch.randn_like(z), ts[: z.shape[0]])
            model.unet(noisy, ts[: z.shape[0]], embeds.expand(z.shape[0], -1, -1))
            sync(device)
            t2 = time.perf_counter()
            vae_s += t1 - t0
            unet_s += t2 - t1
    return vae_s, unet_s, z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timestep", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # On a busy shared CPU, OpenMP threads spin-wait on each other and timings lose meaning.
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/extract_overhead.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    h, w = params["encode"]["resolution"]
    ext = params["extract"]
    batch = int(ext["batch_size"])
    tmp = Path(tempfile.mkdtemp(prefix="extract_bench."))
    try:
        model = build_small_model(read_group(params, "model.small", SmallModelConfig), seed=0)
        save_diffusion_model(model, tmp / "model")
        model.to(args.device)
        for part in (model.vae, model.unet, model.text_encoder):
            part.eval().requires_grad_(False)
        gen = torch.Generator().manual_seed(0)
        images = torch.rand(args.images, 3, h, w, generator=gen) * 2 - 1
        with torch.inference_mode():
            embeds = encode_text(model, [""])
        prompts = Prompts(["plain"], [""], embeds, model.fingerprint)
        shas = [f"{i:064x}" for i in range(args.images)]
        index = pd.DataFrame({"sha256": shas, "split": "val"})

        # Warm-up (allocator, kernels), then interleave bare and extract runs; keep the minimum.
        _, _, z = bare_passes(model, images[:batch], embeds, args.timestep, batch, args.device)
        latents_np = []
        with torch.inference_mode():
            for b0 in range(0, args.images, batch):
                latents_np.append(
                    encode_images(model, images[b0 : b0 + batch].to(args.device)).cpu().numpy()
                )
        lat_arr = create_rows_array(
            tmp / "latents.zarr",
            (args.images, 1, *z.shape[1:]),
            "float32",
            {"model_fingerprint": model.fingerprint, "resolution": [h, w], "encoding": {}},
        )
        lat_arr[:] = np.concatenate(latents_np)[:, None]
        inputs = DomainInputs(index, lat_arr)
        vae_runs, unet_runs, extract_runs = [], [], {m: [] for m in MODES}
        loop_runs, unet_cpu, extract_cpu = [], [], []
        disk: dict[str, int] = {}
        for r in range(args.repeats):
            c0 = time.process_time()
            vae_s, unet_s, _ = bare_passes(model, images, embeds, args.timestep, batch, args.device)
            unet_cpu.append(time.process_time() - c0)  # VAE + UNet CPU seconds (all threads)
            vae_runs.append(vae_s)
            unet_runs.append(unet_s)
            for mode in MODES:
                if mode != "fp16" and r > 0:
                    continue  # the overhead target is about the default mode; others once
                out = tmp / f"t{args.timestep}_{mode}_{r}"
                cfg = read_group({"extract": {**ext, "storage": mode}}, "extract", ExtractConfig)
                sync(args.device)
                t0, c0 = time.perf_counter(), time.process_time()
                taps = resolve_taps(model.unet, cfg.taps, model.vae_stride)
                recipe = FeatureRecipe(
                    taps,
                    args.timestep,
                    cfg.noise_seed,
                    cfg.noise_mode,
                    cfg.conditioning,
                    parse_storage(mode),
                )
                extractor = Extractor(model, recipe, prompts, 1)
                proj = None
                if recipe.storage.kind == "pca":  # fitted on the first images, as extract does
                    proj = extractor.fit_projections(
                        inputs, min(args.images, cfg.pca_fit_images), cfg.pca_fit_pixels, batch
                    )
                res = extract_store(
                    extractor, inputs, prompts, out, cfg, "fp32", progress=False, projections=proj
                )
                sync(args.device)
                extract_runs[mode].append(time.perf_counter() - t0)
                if mode == "fp16":
                    loop_runs.append(res.seconds)
                    extract_cpu.append(time.process_time() - c0)
                feat = sum(p.stat().st_size for p in (out / "features").rglob("*") if p.is_file())
                disk[mode] = feat
                shutil.rmtree(out)
        vae_s, unet_s = min(vae_runs), min(unet_runs)
        ext_s = min(extract_runs["fp16"])
        taps = resolve_taps(model.unet, ext["taps"], model.vae_stride)

        sd_taps = resolve_taps(sd21_unet("meta"), "diff", 8)
        result = {
            "machine": machine_info(),
            "settings": {
                "images": args.images,
                "resolution": [h, w],
                "timestep": args.timestep,
                "batch_size": batch,
                "taps": ext["taps"],
                "repeats": args.repeats,
                "images_per_shard": ext["images_per_shard"],
            },
            "overhead_default_model": {
                "bare_vae_encode_s": vae_s,
                "bare_unet_forward_s": unet_s,
                "extract_fp16_s": ext_s,
                "extract_s_by_mode": {m: min(v) for m, v in extract_runs.items()},
                "extract_fp16_loop_s": min(loop_runs),
                "extract_fp16_setup_s": ext_s - min(loop_runs),
                "ratio_extract_vs_bare_unet": ext_s / unet_s,
                "ratio_extract_loop_vs_bare_unet": min(loop_runs) / unet_s,
                "bare_vae_plus_unet_cpu_s": min(unet_cpu),
                "extract_fp16_cpu_s": min(extract_cpu),
                "ratio_vae_plus_extract_vs_bare_vae_plus_unet": (vae_s + ext_s) / (vae_s + unet_s),
                "target_ratio": 1.15,
            },
            "bytes_per_image_per_timestep": {
                "default_model": {
                    "taps": len(taps),
                    "values": sum(t.channels * (h // t.stride) * (w // t.stride) for t in taps),
                    "stored": {m: stored_bytes(taps, (h, w), m) for m in MODES},
                    "on_disk_compressed": {m: disk[m] / args.images for m in MODES},
                },
                "sd21_diff_1024x512": {
                    "taps": len(sd_taps),
                    "values": sum(
                        t.channels * (512 // t.stride) * (1024 // t.stride) for t in sd_taps
                    ),
                    "strides": sorted({t.stride for t in sd_taps}),
                    "stored": {
                        m: stored_bytes(sd_taps, (512, 1024), m)
                        for m in (*MODES, "pca-64", "pca-256")
                    },
                },
            },
        }
        write_json(args.out, result)
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
