"""What the cache saves, on the SD-2.1 architecture (random weights), in one run.

Measured here (CPU at reduced resolution, or the same script on a GPU): one VAE encode, one UNet
pass (and on CUDA a batch sweep: passes/s and TFLOP/s against the GPU's peak), the training
step of DIFF's recipe head (forward, backward, AdamW) on T = 1 / 5 / 9 timesteps of features,
reading those features from a store, one whole online iteration at T = 1 (to check the sum),
and `extract_store` against the bare UNet passes it runs (the writer's overhead).

Derived from those (the JSON says which is which):
(a) one iteration online (VAE + the UNet passes of T timesteps x paths + head) vs from the
    cache (read + head), T = 1 / 5 / 9, plain and plain + guided (DIFF's two paths), and DIFF's
    own online iteration, which runs its 37-step inversion (1 pass per step, plain; 2 + P per
    step, guided, P = the present class prompts, 5) every iteration;
(b) a sweep of 8 head experiments: one extraction + 8 cached trainings vs 8 online ones;
(c) whether the store's writer keeps up with the GPU: bytes per image per timestep at
    1024x512 (56 MB fp16) over the pass time at 40 % of an H100 (from counted FLOPs).
Each is extrapolated to 1024x512 and GTA5 (24,966 images) x 40k iterations from counted FLOPs
at 40 % of an H100's bf16 dense peak, scaled by the measured ratios.

Usage: python benchmarks/cost_figures.py [--res 128 256] [--device cpu] [--repeats 2]
       python benchmarks/cost_figures.py --device cuda --res 512 512   (bf16 on a GPU)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler
from flops import H100_BF16_DENSE_TFLOPS, count  # this script's folder is on sys.path
from machine import machine_info
from transformers import CLIPTextConfig, CLIPTextModel

from pipeline.cache.encoded import Prompts
from pipeline.cache.reader import FeatureDataset
from pipeline.cache.storage import parse_storage
from pipeline.cache.store import FeatureStore, StoreIdentity, store_path
from pipeline.core.names import FeatureKey
from pipeline.core.params import load_params, read_group
from pipeline.diffusion.build import SD21_CONFIGS, build_tokenizer, sd21_unet
from pipeline.diffusion.model import DiffusionModel
from pipeline.diffusion.taps import resolve_taps
from pipeline.heads.losses import segmentation_ce
from pipeline.loops.extract import Extractor
from pipeline.loops.features import FeatureRecipe
from pipeline.loops.train import TrainConfig, build_model, diff_inputs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PARAMS = load_params(ROOT / "params.yaml")
RECIPE = yaml.safe_load((ROOT / "recipes" / "diff-gta2cs.yaml").read_text())
GTA5_IMAGES, ITERATIONS, STEPS, CLASS_PROMPTS = 24966, 40000, 37, 5
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # bf16 dense, datasheets


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Best wall seconds of `fn` over `repeats` (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def recipe_train() -> TrainConfig:
    return read_group(
        {**PARAMS, "train": {**PARAMS["train"], **RECIPE["train"]}}, "train", TrainConfig
    )


def specs_for(taps, timesteps: list[int]) -> dict[str, tuple[int, int]]:
    return {
        str(FeatureKey(t, tap.name)): (tap.channels, tap.stride) for t in timesteps for tap in taps
    }


def head_step(cfg: TrainConfig, specs: dict, hw: tuple[int, int], device: str, dtype):
    """One training step of the recipe head on random features: a closure, and its GFLOP."""
    head = build_model(cfg, diff_inputs(cfg, specs)).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    feats = {
        k: torch.randn(1, c, hw[0] // s, hw[1] // s, device=device)
        for k, (c, s) in diff_inputs(cfg, specs).items()
    }
    label = torch.randint(0, 19, (1, *hw), device=device)

    def step() -> None:
        with torch.autocast(device_type="cuda", dtype=dtype, enabled=device.startswith("cuda")):
            loss = segmentation_ce(head(feats), label)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        gflop = 3 * count(lambda: head(feats)) / 1e9  # forward + backward ~ 3 forwards
    return step, gflop


def read_step(taps, timesteps: list[int], hw: tuple[int, int], tmp: Path):
    """Reading one sample's features of `timesteps` (fp16 store, hot page cache): a closure."""
    paths = []
    for t in timesteps:
        shapes = {tp.name: (tp.channels, hw[0] // tp.stride, hw[1] // tp.stride) for tp in taps}
        ident = StoreIdentity(
            "cost",
            tuple(shapes),
            tuple(tp.module_path for tp in taps),
            t,
            0,
            "add",
            "",
            "single",
            "{}",
            "cost",
            hw,
            ("",),
            1,
            "fp16",
            "fp32",
            "none",
        )
        path = store_path(tmp, t, "gta5")
        store = FeatureStore.create(path, ident, 2, shapes, {tp.name: tp.stride for tp in taps}, 2)
        rng = np.random.default_rng(t)
        store.write_shard(
            0,
            {
                k: rng.standard_normal((2, 1, *v), np.float32).astype(np.float16)
                for k, v in shapes.items()
            },
        )
        paths.append(path)
    ds = FeatureDataset(paths, labels=False, encoded_dir=tmp, domain="gta5", threads=4)
    return lambda: ds[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, nargs=2, default=[128, 256], help="H W of the image")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--disk-gbps", type=float, default=7.0, help="for the disk-bound figure")
    args = ap.parse_args()
    device, hw = args.device, tuple(args.res)
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    unet = sd21_unet(device).to(dtype).eval().requires_grad_(False)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD21_CONFIGS / "vae"))
    vae = vae.to(device, dtype).eval().requires_grad_(False)
    taps = resolve_taps(sd21_unet("meta"), "diff", 8)
    lat_hw = (hw[0] // 8, hw[1] // 8)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    image = torch.randn(1, 3, *hw, device=device, dtype=dtype)
    measured: dict = {}
    with torch.no_grad():
        measured["vae_encode_s"] = timed(lambda: vae.encode(image), device, args.repeats)
        x = torch.randn(1, 4, *lat_hw, device=device, dtype=dtype)
        t = torch.tensor([50], device=device)
        measured["unet_pass_s"] = timed(lambda: unet(x, t, ctx), device, args.repeats)
        with torch.device("meta"):
            meta_unet = sd21_unet("meta")
            pass_gflop = (
                count(
                    lambda: meta_unet(
                        torch.zeros(1, 4, *lat_hw), torch.tensor([50]), torch.zeros(1, 77, 1024)
                    )
                )
                / 1e9
            )
            meta_vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD21_CONFIGS / "vae"))
            vae_gflop = count(lambda: meta_vae.encode(torch.zeros(1, 3, *hw))) / 1e9
        sweep = []
        for b in args.batches if cuda else [1, 2]:
            xb = torch.randn(b, 4, *lat_hw, device=device, dtype=dtype)
            sec = timed(
                lambda xb=xb, b=b: unet(xb, t.expand(b), ctx.expand(b, -1, -1)),
                device,
                args.repeats,
            )
            sweep.append(
                {
                    "batch": b,
                    "passes_per_s": round(b / sec, 3),
                    "tflops": round(b * pass_gflop / sec / 1e3, 2),
                }
            )
        measured["unet_batch_sweep"] = sweep
    cfg = recipe_train()
    heads, reads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for T in (1, 5, 9):
            ts = RECIPE["timesteps"][:T]
            step, gflop = head_step(cfg, specs_for(taps, ts), hw, device, dtype)
            heads[T] = {"seconds": timed(step, device, args.repeats), "gflop": round(gflop, 1)}
            reads[T] = timed(read_step(taps, ts, hw, Path(tmp) / f"T{T}"), "cpu", args.repeats)
            del step
    measured["head_step"] = {
        str(k): {**v, "seconds": round(v["seconds"], 3)} for k, v in heads.items()
    }
    measured["read_sample_s"] = {str(k): round(v, 4) for k, v in reads.items()}

    # One whole online iteration at T = 1 (VAE, the two passes of DIFF's conditioning, head).
    step1, _ = head_step(cfg, specs_for(taps, RECIPE["timesteps"][:1]), hw, device, dtype)

    def online_t1() -> None:
        with torch.no_grad():
            vae.encode(image)
            unet(x, t, ctx)
            unet(x, t, ctx)
        step1()

    measured["online_iteration_T1_s"] = round(timed(online_t1, device, args.repeats), 3)

    # (c) extract_store's work per image (hooks, fp16 reduction, host copy) against bare passes.
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD21_CONFIGS / "text_encoder"))
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(SD21_CONFIGS / "scheduler"))
    model = DiffusionModel(
        build_tokenizer(),
        scheduler,
        dict(vae.config),
        dict(unet.config),
        unet=unet,
        text_encoder=text_encoder.to(device, dtype).eval(),
    )
    prompts = Prompts(["plain"], [""], torch.zeros(1, 77, 1024), "cost")
    overhead = {}
    for storage in ("fp16", "int8", "pca-64"):
        recipe = FeatureRecipe(taps, 50, 0, "add", "diff", parse_storage(storage))
        if storage == "pca-64":
            recipe.projections = {
                tp.name: (torch.randn(64, tp.channels), torch.zeros(tp.channels)) for tp in taps
            }
        ext = Extractor(model, recipe, prompts, 1)
        xt = {"plain": torch.randn(1, 1, 4, *lat_hw)}
        sec = timed(lambda xt=xt, ext=ext: ext.batch(xt), device, args.repeats)
        overhead[storage] = {
            "extract_s": round(sec, 3),
            "over_bare_passes": round(sec / (2 * measured["unet_pass_s"]), 3),
        }
    measured["extract_batch_vs_bare"] = overhead

    # ---- derived --------------------------------------------------------------------------
    p, v = measured["unet_pass_s"], measured["vae_encode_s"]
    passes_per_t = 2  # DIFF's conditioning: the "" pass and the prompt's
    table = []
    for T in (1, 5, 9):
        h, r = heads[T]["seconds"], reads[T]
        for paths in (1, 2):
            online = v + T * passes_per_t * paths * p + h
            table.append(
                {
                    "T": T,
                    "paths": paths,
                    "online_s": round(online, 2),
                    "cached_s": round(r + h, 3),
                    "online_over_cached": round(online / (r + h), 2),
                }
            )
    diff_online = v + (STEPS + STEPS * (2 + CLASS_PROMPTS)) * p + heads[9]["seconds"]
    derived = {
        "a_iteration": table,
        "a_diff_online_with_inversion": {
            "unet_passes": STEPS + STEPS * (2 + CLASS_PROMPTS),
            "online_s": round(diff_online, 1),
            "over_cached_T9": round(diff_online / (reads[9] + heads[9]["seconds"]), 1),
        },
    }
    # (b) 8 head experiments on `images` images for `iterations` each (at this resolution).
    extraction_per_image = v + 9 * passes_per_t * 2 * p + STEPS * (3 + CLASS_PROMPTS) * p
    sweep_rows = {}
    for images, iters in ((GTA5_IMAGES, ITERATIONS), (GTA5_IMAGES, 4000)):
        online = 8 * iters * diff_online
        cached = images * extraction_per_image + 8 * iters * (reads[9] + heads[9]["seconds"])
        sweep_rows[f"{images}_images_{iters}_iterations"] = round(online / cached, 2)
    derived["b_eight_heads_online_over_cached"] = sweep_rows
    # Extrapolation to 1024x512 on an H100 at 40 %, from counted FLOPs.
    with torch.device("meta"):
        full_pass = (
            count(
                lambda: meta_unet(
                    torch.zeros(1, 4, 64, 128), torch.tensor([50]), torch.zeros(1, 77, 1024)
                )
            )
            / 1e9
        )
        full_vae = count(lambda: meta_vae.encode(torch.zeros(1, 3, 512, 1024))) / 1e9
    gpu = 0.4 * H100_BF16_DENSE_TFLOPS * 1e3  # GFLOP/s
    crop_head = heads[9]["gflop"] * (512 * 512) / (hw[0] * hw[1])
    gpu_pass, gpu_vae, gpu_head = full_pass / gpu, full_vae / gpu, crop_head / gpu
    bytes_per_image_t = sum(
        2 * tp.channels * (512 // tp.stride) * (1024 // tp.stride) for tp in taps
    )
    # What the recipe's head reads per timestep (DIFF's finecoder drops stride 64).
    read = [
        (tp.channels, (512 // tp.stride) * (1024 // tp.stride)) for tp in taps if tp.stride <= 32
    ]
    per_image = {
        "fp16": sum(2 * c * n for c, n in read),
        "int8": sum(c * n + 4 * c for c, n in read),
        "pca-64": sum(2 * 64 * n for _, n in read),
    }
    gpu_diff_online = gpu_vae + (STEPS + STEPS * (2 + CLASS_PROMPTS)) * gpu_pass + gpu_head
    derived["extrapolated_h100_40pct_1024x512"] = {
        "unet_pass_s": round(gpu_pass, 4),
        "vae_encode_s": round(gpu_vae, 4),
        "head_step_T9_512crop_s": round(gpu_head, 4),
        "diff_online_iteration_s": round(gpu_diff_online, 3),
        "diff_online_40k_iterations_h": round(ITERATIONS * gpu_diff_online / 3600, 1),
        "cache_gta5_9_timesteps_with_inversion_h": round(
            GTA5_IMAGES * (gpu_vae + (9 * 2 * 2 + STEPS * (3 + CLASS_PROMPTS)) * gpu_pass) / 3600, 1
        ),
        "cached_40k_iterations_compute_h": round(ITERATIONS * gpu_head / 3600, 2),
        # A 512 crop reads its images' whole chunks: 9 timesteps x the taps the head reads.
        "cached_40k_iterations_disk_bound_h": {
            storage: round(ITERATIONS * 9 * b / (args.disk_gbps * 1e9) / 3600, 2)
            for storage, b in per_image.items()
        },
        "c_writer_needs_GB_per_s": round(bytes_per_image_t / gpu_pass / 1e9, 1),
        "c_bytes_per_image_per_timestep_MB": round(bytes_per_image_t / 1e6, 1),
    }
    peak = next(
        (v for k, v in PEAK_TFLOPS.items() if cuda and k in torch.cuda.get_device_name()), None
    )
    out = {
        "machine": machine_info(),
        "settings": {**vars(args), "dtype": str(dtype)},
        "counted_gflop": {
            "unet_pass": round(pass_gflop, 1),
            "vae_encode": round(vae_gflop, 1),
            "unet_pass_1024x512": round(full_pass, 1),
        },
        "gpu_peak_tflops": peak,
        "measured": measured,
        "derived": derived,
    }
    name = "cost_figures_gpu.json" if cuda else "cost_figures.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
