"""The SD-2.1 rehearsal (`make rehearsal`): DIFF's recipe on the real SD-2.1 architecture, on CPU.

What a researcher runs before renting GPUs. It builds an SD-2.1-architecture diffusers folder
with random weights from pipeline/diffusion/sd21 (cached in .rehearsal/ between runs), makes
tiny GTA5 and Cityscapes trees in their published layouts at their real sizes (1914x1052 and
2048x1024), and runs recipes/diff-gta2cs.yaml through real `dvc repro`, one stage at a time, in
a fresh git + DVC project, scaled down: 6 GTA5 and 2 Cityscapes images, 128x256 canvases,
crop draws of 128x128 (DIFF's 512x512 of 1280x704, scaled), 4 training iterations, no guided
path (its cost is in benchmarks/cost.py). Everything else is the recipe: crop draws K = 2 of
every GTA5 image (all of them train), SD-2.1's UNet, DIFF's taps, its 37-step inversion, its 9
timesteps and two-pass conditioning, its finecoder and DAFormer head.

Checks: the crop stores' taps, channels and strides against DIFF's (per stride with 9
timesteps: 34560 / 69120 / 34560 / 17280 input channels), their shapes (2 draws of 128x128),
that evaluate scored the Cityscapes tree at 2048x1024 (its labelIds exports), and a no-op
`dvc repro` afterwards. Writes wall time and peak RSS per stage, and the crop stores' shapes
and bytes per draw (and what they are at 512x512) to benchmarks/results/rehearsal.json.

`--recipe cleandift-gta2cs` (`make rehearsal-clean`) runs the clean recipe the same way: one
store at t = 261 read on the clean latents by a UNet given as a safetensors state dict in
CleanDIFT's key layout (random weights, 1.7 GB, cached in .rehearsal/), no inversion, and writes
benchmarks/results/rehearsal-cleandift.json: its passes and bytes per draw beside DIFF's.

Usage: python tests/rehearsal.py [--recipe NAME] [--keep]

A system test rather than a unit test (pytest does not collect it; ~9 min on 2 cores and
2.5 GB of weights, so not in CI); its figures are measurements, so its results live with the benchmarks'.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import yaml
from _project import COPIED  # what the test suite's project copies hold: this script's folder
from PIL import Image

from pipeline.cache.reader import tap_specs
from pipeline.cache.store import FeatureStore, store_path
from pipeline.core.classes import TRAIN_ID_TO_LABEL_ID
from pipeline.core.fileio import folder_bytes
from pipeline.core.params import apply_recipe as apply  # how a recipe overlays params.yaml
from pipeline.core.params import load_params
from pipeline.data.synthetic import SceneGenerator
from pipeline.diffusion.build import build_sd21_model, random_sd21_folder
from pipeline.plan.budget import plan
from pipeline.reporting.machine import Run  # results files carry the machine, as benchmarks'

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".rehearsal"  # the random SD-2.1 (2.5 GB) the benchmarks run on too, and scratch

RESULTS = {
    "diff-gta2cs": ROOT / "benchmarks" / "results" / "rehearsal.json",
    "cleandift-gta2cs": ROOT / "benchmarks" / "results" / "rehearsal-cleandift.json",
}
DIFF_CHANNELS = {64: 34560, 32: 69120, 16: 34560, 8: 17280}  # per stride, 9 timesteps
GTA_SCALE = {"gta5": 24966, "cityscapes": 500, "acdc": 406, "darkzurich": 50}
CROP = [128, 128]  # DIFF's 512x512 of a 1280x704 canvas, at the rehearsal's 128x256
SCALED = {
    "model": {"dtype": "fp32", "device": "cpu"},
    "encode": {"crop": CROP, "batch_size": 8},
    "invert": {"batch_size": 8},
    # fp16: the channel check reads the taps' full widths (the recipe's PCA stores 64 per
    # tap), and 6 scaled crops hold fewer feature pixels at stride 64 than 64 components need.
    "extract": {"batch_size": 8, "shard_mb": 8, "storage": "fp16"},  # 4 crops a shard
    "prompts": {"variants": ["plain"]},
    # rcs_min_pixels: DIFF's 3000, counted on the trees' original 1914x1052 labels as DIFF's.
    "train": {
        "iterations": 4,
        "batch_size": 2,
        "guided_weight": 0.0,
        "checkpoint_interval": 4,
        "device": "cpu",
    },
    "loader": {"memory_budget_mb": 4096, "workers": 0},
    "evaluate": {"device": "cpu", "batch_size": 2},
}


def cleandift_unet() -> Path:
    """A UNet state dict as CleanDIFT ships it (cleandift_sd21_unet.safetensors: diffusers'
    keys, loaded with strict=True), random weights of another seed, fp16, built once."""
    path = WORK / "cleandift_sd21_unet.safetensors"
    if not path.is_file():
        unet = build_sd21_model(seed=1).unet
        state = {k: v.half().contiguous() for k, v in unet.state_dict().items()}
        safetensors.torch.save_file(state, str(path))
    return path


def trees() -> tuple[Path, Path]:
    """Tiny GTA5 (images/, labels/ at 1914x1052) and Cityscapes (leftImg8bit/, gtFine/ val at
    2048x1024) trees, label ids as the datasets store them."""
    gta, cs = WORK / "gta5", WORK / "cityscapes"
    if not gta.is_dir():
        gen = SceneGenerator(1052, 1914, seed=0)
        for i in range(6):
            image, label = gen.sample(i, "game", "train")
            for folder, array in (("images", image), ("labels", TRAIN_ID_TO_LABEL_ID[label])):
                (gta / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(gta / folder / f"{i:05d}.png", compress_level=1)
    if not cs.is_dir():
        gen = SceneGenerator(1024, 2048, seed=1)
        for i in range(2):
            image, label = gen.sample(i, "real", "val")
            stem = f"frankfurt_{i:06d}_000019"
            for folder, name, array in (
                ("leftImg8bit", "leftImg8bit", image),
                ("gtFine", "gtFine_labelIds", TRAIN_ID_TO_LABEL_ID[label]),
            ):
                path = cs / folder / "val" / "frankfurt" / f"{stem}_{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path, compress_level=1)
    return gta, cs


def project(recipe: str, model: Path, gta: Path, cs: Path) -> tuple[Path, dict]:
    """A fresh git + DVC project with the recipe's params, scaled down."""
    proj = WORK / "project"
    shutil.rmtree(proj, ignore_errors=True)
    for name in COPIED:
        src, dst = ROOT / name, proj / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    params = apply(
        load_params(ROOT / "params.yaml"), load_params(ROOT / "recipes" / f"{recipe}.yaml")
    )
    params = apply(params, SCALED)
    params["model"]["source"] = str(model)
    if params["model"]["unet"] is not None:
        params["model"]["unet"] = str(cleandift_unet())
    params["data"]["source"] = {
        "kind": "gta5",
        "root": str(gta),
        "split": "all",
        "val_fraction": 0.0,  # the recipe's: all of GTA5 trains
        "resolution": [128, 256],
    }
    params["data"]["targets"] = {
        "cityscapes": {
            "kind": "cityscapes",
            "root": str(cs),
            "split": "val",
            "resolution": [128, 256],
        }
    }
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, width=100))
    (proj / ".gitignore").write_text("/data/\n__pycache__/\n")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "rehearsal"]):
        subprocess.run(
            cmd,
            cwd=proj,
            check=True,
            capture_output=True,
            env={
                **os.environ,
                "GIT_AUTHOR_NAME": "r",
                "GIT_AUTHOR_EMAIL": "r@x",
                "GIT_COMMITTER_NAME": "r",
                "GIT_COMMITTER_EMAIL": "r@x",
            },
        )
    return proj, params


def stage(proj: Path, name: str) -> dict:
    """`dvc repro -s <name>` under /usr/bin/time: wall seconds and the peak RSS of the stage."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "RSS_KB %M", "dvc", "repro", "-s", name],
        cwd=proj,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"rehearsal: stage {name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    rss = int(next(ln for ln in proc.stderr.splitlines() if ln.startswith("RSS_KB")).split()[1])
    print(f"{name}: {wall:.0f} s, peak RSS {rss / 2**20:.2f} GiB", flush=True)
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(rss / 2**20, 2)}


def crop_stores(paths: list[Path]) -> dict:
    """The crop stores' shapes and bytes per draw, and the same at DIFF's 512x512 crops."""
    store = FeatureStore.open(paths[0])
    draws = store.identity.draws
    shapes = {
        t: [store.n_images, store.identity.n_variants, *store.stored_shape(t)] for t in store.taps
    }
    per_draw = sum(int(np.prod(store.stored_shape(t))) for t in store.taps) * 2  # fp16
    at_512 = (
        sum(
            store.tap_info[t]["channels"] * (512 // store.tap_info[t]["stride"]) ** 2
            for t in store.taps
        )
        * 2
    )
    stride8 = [t for t in store.taps if store.tap_info[t]["stride"] == 8]
    return {
        "set": paths[0].name,
        "images": store.n_images,
        "draws": draws,
        "resolution": list(store.identity.resolution),
        "shapes_t0": shapes,
        "stride8_map": list(store.stored_shape(stride8[0])[1:]),
        "bytes_per_draw_per_timestep": per_draw,
        "bytes_per_draw_all_timesteps": per_draw * len(paths),
        "at_512x512": {
            "stride8_map": [64, 64],
            "bytes_per_draw_per_timestep": at_512,
            "bytes_per_draw_all_timesteps": at_512 * len(paths),
        },
    }


def checks(run: Run, proj: Path, params: dict) -> dict:
    """The crop stores against DIFF's channels per stride (per timestep: DIFF's 9 or the clean
    recipe's 1); evaluate at Cityscapes' 2048x1024."""
    paths = [store_path(proj / "data" / "features", t, "gta5-crops") for t in params["timesteps"]]
    per_stride: dict[int, int] = {}
    for channels, stride in tap_specs(paths).values():
        per_stride[stride] = per_stride.get(stride, 0) + channels
    crops = crop_stores(paths)
    exports = sorted((proj / "data" / "predictions" / "cityscapes" / "labelIds").glob("*.png"))
    sizes = sorted({Image.open(p).size for p in exports})
    scores = json.loads((proj / "metrics" / "evaluate.json").read_text())
    out = {
        "channels_per_stride": {str(k): v for k, v in sorted(per_stride.items(), reverse=True)},
        "matches_diff": per_stride == {s: c * len(paths) // 9 for s, c in DIFF_CHANNELS.items()},
        "taps": len(tap_specs(paths[:1])),
        "cityscapes_exports": len(exports),
        "cityscapes_export_sizes": [list(s) for s in sizes],
        "scored_at_2048x1024": sizes == [(2048, 1024)],
        "mIoU": {d: s["mIoU"] for d, s in scores.items()},
        "crop_stores": crops,
    }
    crops_ok = crops["draws"] == 2 and crops["resolution"] == CROP and crops["images"] == 6
    ok = out["matches_diff"] and out["scored_at_2048x1024"] and out["taps"] == 21 and crops_ok
    run.check(ok, "the stores or the scoring are not DIFF's", out)
    return out


def projected(proj: Path, params: dict) -> dict:
    """What `python -m pipeline.plan` projected against what the run wrote: the stores (exact
    but for metadata: within 5 %) and the trajectories (zstd on disk: at most the projection)."""
    budget = plan(params, root=proj, count_flops=False)
    out = {}
    for what, stage in (("features", "extract"), ("trajectories", "invert")):
        bytes_ = sum(r.bytes for r in budget.rows if r.stage.startswith(stage))
        actual = folder_bytes(proj / "data" / what)
        out[what] = {
            "projected": bytes_,
            "actual": actual,
            # no inversion (noise_mode clean): the stage writes a note of a few bytes
            "actual_over_projected": actual / bytes_ if bytes_ else None,
        }
    return out


def passes_per_draw(recipe: str) -> dict[str, float]:
    """UNet passes per GTA5 crop draw, per stage, of the recipe unscaled (guided view included)
    at GTA5's size: the plan's rows."""
    params = apply(
        load_params(ROOT / "params.yaml"), load_params(ROOT / "recipes" / f"{recipe}.yaml")
    )
    budget = plan(params, GTA_SCALE, count_flops=False)
    rows = [r for r in budget.rows if r.what.startswith("gta5-crops")]
    out = {r.stage.split("@")[0]: r.passes / (r.images * r.draws) for r in rows if r.passes}
    return {**out, "all": sum(out.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", choices=sorted(RESULTS), default="diff-gta2cs")
    ap.add_argument("--keep", action="store_true", help="keep .rehearsal/project afterwards")
    args = ap.parse_args()
    run = Run()
    t0 = time.perf_counter()
    model = random_sd21_folder(WORK / "sd21-random")
    gta, cs = trees()
    setup = time.perf_counter() - t0
    proj, params = project(args.recipe, model, gta, cs)
    names = [
        "check_params",  # every stage depends on its output; `repro -s` runs one stage only
        "prepare",
        "build_model",
        "pretrain",
        "encode",
        "cleandift",  # a note: cleandift.steps 0 (the UNet comes as a file)
        "invert",
        *[f"extract@{t}" for t in params["timesteps"]],
        "train",
        "evaluate",
    ]
    stages = {name: stage(proj, name) for name in names}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    again = subprocess.run(
        ["dvc", "repro", "evaluate"], cwd=proj, env=env, capture_output=True, text=True
    )
    noop = "Running stage" not in again.stdout and again.returncode == 0
    found = checks(run, proj, params)
    run.check(noop, "a second `dvc repro` ran stages")
    found["plan"] = projected(proj, params)
    run.check(
        abs(found["plan"]["features"]["actual_over_projected"] - 1) < 0.05
        and (found["plan"]["trajectories"]["actual_over_projected"] or 0) <= 1
        and found["plan"]["trajectories"]["actual"]
        < 4096 + found["plan"]["trajectories"]["projected"],
        "the plan's projection misses what the run wrote",
        found["plan"],
    )
    result = {
        "recipe": args.recipe,
        "passes_per_draw": {name: passes_per_draw(name) for name in sorted(RESULTS)},
        "setup_s": round(setup, 1),
        "stages": stages,
        "total_s": round(time.perf_counter() - t0, 1),
        "checks": {**found, "noop_repro_after": noop},
    }
    print(json.dumps(run.write(RESULTS[args.recipe], result), indent=2))
    if not args.keep:
        shutil.rmtree(proj)


if __name__ == "__main__":
    main()
