"""The GPU measurements DIFF's recipe at GTA scale rests on, in one run of under 10 minutes on one
H100 (`make gpu-bench`), written to results/gpu_bench.json with the machine it ran on.

1. extraction: UNet passes per second of the extraction path (the recipe's 21 taps, the storage
   reduction on the device, the copy to the host) on SD-2.1's architecture at a 512x512 crop in
   bf16, per batch size, up to the batch that fills the GPU (out of memory, or no gain);
2. online vs cached: DIFF's iteration (its inversion, plain and guided, every iteration: 168
   passes) and T = 9 with the guided view, each side by side with the cached head step reading
   a store on local disk (`cost.py`'s arms, interleaved, fewer rounds);
3. the loader from local disk: DIFF's training samples (both views, 9 timesteps, 512x512,
   `pca-64-int8`) read cold and random through the training DataLoader with the recipe's
   `loader` group (`recipe_reads.py`'s writer and reader), against what the head consumes;
4. a two-rank NCCL training step of the recipe's head (DDP, one rank per GPU) beside one rank,
   when the machine has two GPUs (else noted as skipped).

Random weights (the architecture sets the cost). `--toy` runs every part on the CPU at toy size
(a small SD-family model, 64x64, `pca-4-int8`, gloo for the two ranks), the script's own checks
included: how it is tested without a GPU (`make gpu-bench-toy`). A failed check exits 1 and
writes nothing.

    python benchmarks/gpu_bench.py                      # on the GPU host (make gpu-bench)
    python benchmarks/gpu_bench.py --toy --out /tmp/gpu_bench_toy.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.reporting.machine import ROOT, Run, drop_page_cache

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_bench.json"


@dataclasses.dataclass(frozen=True)
class Size:
    """What the run measures at: the real recipe on a GPU, or a toy on the CPU."""

    res: tuple[int, int]
    dtype: str
    storage: str
    batches: tuple[int, ...]
    loader_images: int
    loader_samples: int
    rounds: int


GPU = Size((512, 512), "bf16", "pca-64-int8", (1, 2, 4, 8, 16, 32, 64), 48, 32, 3)
TOY = Size((64, 64), "fp32", "pca-4-int8", (1, 2, 4), 6, 4, 2)


def model_for(toy: bool, device: str, dtype: str):
    """SD-2.1's architecture with random weights, or the toy: a small SD-family model."""
    from pipeline.diffusion.build import SmallModelConfig, build_sd21_model, build_small_model
    from pipeline.diffusion.model import DTYPES

    if toy:
        small = {
            **dict(
                vae_channels=[8, 8, 8, 8], vae_layers_per_block=1, unet_channels=[8, 16, 32, 32]
            ),
            **dict(unet_heads=[1, 1, 2, 2], norm_num_groups=4, text_hidden=16, text_layers=1),
            **dict(text_heads=1, latent_channels=4, prediction_type="v_prediction", sample_size=64),
        }
        model = build_small_model(SmallModelConfig(**small), seed=0)
    else:
        model = build_sd21_model(seed=0)
    for part in (model.unet, model.vae, model.text_encoder):
        part.to(device, DTYPES[dtype]).requires_grad_(False).eval()
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def extraction(model, size: Size, device: str) -> dict[str, Any]:
    """Passes/s of the extraction path per batch size; the best, and where memory ran out."""
    import cost

    from pipeline.cache.storage import parse_storage
    from pipeline.diffusion.taps import resolve_taps
    from pipeline.diffusion.text import encode_text
    from pipeline.diffusion.unet_features import unet_features

    taps = resolve_taps(model.unet, "diff", model.vae_stride)
    mode = parse_storage(size.storage)
    proj = cost.random_projections(taps, mode) or {}
    context = encode_text(model, [""]).to(device, model.dtype)
    h, w = (s // model.vae_stride for s in size.res)
    rates: dict[int, float] = {}
    stopped = ""
    for b in size.batches:
        latents = torch.randn(
            b, model.unet.config.in_channels, h, w, device=device, dtype=model.dtype
        )
        times = []
        try:
            for i in range(4):
                sync(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    maps = unet_features(model, latents, 91, context, taps)
                    out = [mode.reduce(x, proj.get(n)) for n, x in maps.items()]
                    host = [{a: x.cpu() for a, x in stored.items()} for stored in out]
                sync(device)
                if i:  # the first call warms up (kernels, allocator)
                    times.append(time.perf_counter() - t0)
            del maps, out, host
        except torch.cuda.OutOfMemoryError:
            stopped = f"out of memory at batch {b}"
            break
        rates[b] = b / statistics.median(times)
        best = max(rates.values())
        if rates[b] < 1.05 * best and b > min(rates) and rates[b] < best:
            stopped = f"no gain beyond batch {max(k for k, v in rates.items() if v == best)}"
            break
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    best_batch = max(rates, key=rates.get)
    return {
        "passes_per_s": {str(b): round(r, 2) for b, r in rates.items()},
        "best_batch": best_batch,
        "best_passes_per_s": round(rates[best_batch], 2),
        "stopped": stopped or "the batch sweep's end",
        "crop": list(size.res),
        "dtype": size.dtype,
        "storage": size.storage,
        "taps": len(taps),
    }


def online_vs_cached(model, size: Size, device: str, run: Run, toy: bool) -> dict[str, Any]:
    """cost.py's arms (DIFF's iteration; T = 9 with the guided view) side by side, fewer rounds."""
    import cost

    from pipeline.cache.storage import parse_storage
    from pipeline.core.params import read_group
    from pipeline.diffusion.taps import resolve_taps
    from pipeline.loops.train import TrainConfig

    taps = resolve_taps(model.unet, "diff", model.vae_stride)
    train = {**cost.PARAMS["train"], **cost.RECIPE["train"]}
    if toy:  # the recipe's head is 2048 wide: the toy's stays small
        train |= {"widths": [16, 32, 64, 128], "embed_dim": 16}
    cfg = read_group({**cost.PARAMS, "train": train}, "train", TrainConfig)
    mode = parse_storage(size.storage)
    projections = cost.random_projections(taps, mode)
    args = argparse.Namespace(storage=size.storage, device=device, workers=0)
    counter = cost.Counter(model.unet)
    cold = drop_page_cache()
    out = {}
    with tempfile.TemporaryDirectory(dir=ROOT / ".bench") as tmp:
        for name in ("T9_guided", "diff_inversion_every_iteration"):
            s = next(x for x in cost.SETTINGS if x.name == name)
            s = dataclasses.replace(s, rounds=size.rounds, iterations=2)
            t = cost.measure(
                s, model, taps, cfg, size.res, args, projections, counter, cold, Path(tmp), run
            )
            out[name] = {
                "online_s": t["online"],
                "cached_s": t["cached"],
                "online_over_cached": round(t["ratio_of_medians"], 2),
                "unet_passes_per_iteration": t["unet_passes_per_iteration"],
            }
            run.check(t["ratio_of_medians"] > 1, f"{name}: online not slower than cached", t)
    return out


def loader(size: Size, work: Path, toy: bool) -> dict[str, Any]:
    """recipe_reads.py's stores (here: smaller) read cold and random through the DataLoader."""
    import recipe_reads
    import yaml

    recipe_loader = yaml.safe_load((ROOT / "recipes" / "diff-gta2cs.yaml").read_text())["loader"]
    settings = {k: int(recipe_loader[k]) for k in ("workers", "prefetch", "read_threads")}
    built = recipe_reads.worker_build(work, size.loader_images, size.res, size.storage, toy)
    picks = random.Random(0).sample(
        [[r, d] for r in range(size.loader_images) for d in range(recipe_reads.K)],
        size.loader_samples,
    )
    cold = drop_page_cache()
    got = recipe_reads.worker_read(work, picks, settings)
    return {
        **settings,
        "images": size.loader_images,
        "files": built["files"],
        "bytes": built["bytes"],
        "write_MB_s": round(built["write_MB_s"], 1),
        "samples_per_s": round(got["samples_s"], 2),
        "MB_per_sample": round(got["MB_per_sample"], 2),
        "MB_per_s": round(got["samples_s"] * got["MB_per_sample"], 1),
        "cold": cold,
        "checked": got["checked"],
    }


def ddp_step_worker(toy: bool) -> None:
    """One rank of the two-rank step (under torchrun): the recipe head's DDP training step on
    random features of the recipe's shapes; rank 0 prints the median seconds."""
    import cost
    import torch.distributed as dist

    from pipeline.core.device import init_distributed
    from pipeline.core.params import read_group
    from pipeline.heads.losses import views_loss
    from pipeline.loops.train import TrainConfig, build_model

    size = TOY if toy else GPU
    rank, world, device = init_distributed("cpu" if toy else "cuda")
    train = {**cost.PARAMS["train"], **cost.RECIPE["train"]}
    if toy:
        train |= {"widths": [16, 32, 64, 128], "embed_dim": 16}
    cfg = read_group({**cost.PARAMS, "train": train}, "train", TrainConfig)
    k = 4 if toy else 64
    strides = {8: 6, 16: 6, 32: 6}  # the finecoder's 18 taps a timestep
    specs = {
        f"t{t}/s{s}_{i}": (k, s) for t in cost.T9 for s, n in strides.items() for i in range(n)
    }
    model = build_model(cfg, specs).to(device).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if toy else [device])
    opt = torch.optim.AdamW(ddp.parameters(), lr=cfg.lr)
    h, w = size.res
    feats = {
        key: torch.randn(1, 2, c, h // s, w // s, device=device) for key, (c, s) in specs.items()
    }
    label = torch.randint(0, 19, (1, h, w), device=device)
    times = []
    for i in range(6):
        sync(device)
        t0 = time.perf_counter()
        loss, _ = views_loss(ddp, feats, label, cfg.view_loss())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    dist.barrier()
    if rank == 0:
        print(f"DDP_STEP_S {statistics.median(times)} {world}", flush=True)
    dist.destroy_process_group()


def two_ranks(toy: bool) -> dict[str, Any]:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not toy and gpus < 2:
        return {"skipped": f"{gpus} GPU(s) on this machine"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [__file__, "--ddp-worker", *(["--toy"] if toy else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("DDP_STEP_S")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"two-rank step failed: {out.stderr[-3000:]}")
    _, seconds, world = line.split()
    return {
        "backend": "gloo" if toy else "nccl",
        "ranks": int(world),
        "step_s": round(float(seconds), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="every part on the CPU at toy size")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ddp_worker:
        ddp_step_worker(args.toy)
        return
    run = Run()
    device = "cpu" if args.toy else "cuda"
    if not args.toy and not torch.cuda.is_available():
        run.fail("no CUDA GPU here; `--toy` runs the same parts on the CPU")
    size = TOY if args.toy else GPU
    t0 = time.perf_counter()
    results: dict[str, Any] = {"toy": args.toy}
    model = model_for(args.toy, device, size.dtype)
    results["extraction"] = extraction(model, size, device)
    print(f"extraction: {results['extraction']}", flush=True)
    results["online_vs_cached"] = online_vs_cached(model, size, device, run, args.toy)
    print(f"online vs cached: {results['online_vs_cached']}", flush=True)
    del model
    work = ROOT / ".bench" / "gpu_bench_loader"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        results["loader"] = loader(size, work, args.toy)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run.check(results["loader"]["checked"], "the loader read other values than were written")
    print(f"loader: {results['loader']}", flush=True)
    results["two_ranks"] = two_ranks(args.toy)
    print(f"two ranks: {results['two_ranks']}", flush=True)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    run.write(args.out, results)


if __name__ == "__main__":
    main()
