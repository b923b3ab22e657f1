"""The DVC experiments the results tables report: queue them, then export what they measured.

    python experiments/run.py queue [NAME ...]   # dvc exp run --queue -n NAME -S ...
    dvc queue start && dvc queue status          # run them (one worker on 2 cores)
    python experiments/run.py export             # -> experiments/results.json

Each experiment is one queued run of the default pipeline with the params below changed, up to
`evaluate` (or up to `tune_prompt` for the TUNED ones). The export keeps, per experiment, its
params changes, its git revision and the metrics the tables read (per-domain mIoU and aAcc, stage
seconds and megabytes, pretraining loss): the experiment tables are rebuilt from that
committed file (docs/tables.py), never from experiments that exist in one clone only. An
experiment this clone does not hold keeps its committed entry (experiments live in one clone's
git refs; the file is what every clone shares).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pipeline.reporting.machine import Run  # results files carry the machine, as the benchmarks'

ROOT = Path(__file__).resolve().parents[1]

RESULTS = Path(__file__).resolve().parent / "results.json"
# Prompt randomization (Gong et al.): the scene prompt and its four condition variants
RANDOMIZED = "[scene,night,fog,rain,game]"
# name -> the `-S` overrides of `dvc exp run` (the default: none)
EXPERIMENTS: dict[str, list[str]] = {
    # Crop draws (encode.crop) against crops cut in feature space, 64x128 of the 128x256 scenes
    "crop-feature": ["sampling.feature_crop=[64,128]"],
    "crop-draws-k1": ["encode.crop=[64,128]", "encode.draws=1"],
    "crop-draws-k2": ["encode.crop=[64,128]", "encode.draws=2"],
    "crop-draws-k4": ["encode.crop=[64,128]", "encode.draws=4"],
    # The head's seed (init, sampling order, noise draws at train time) on the same features:
    # how far apart two runs of one setting land (the spread the other rows are read against)
    "train-seed-1": ["train.seed=1"],
    "train-seed-2": ["train.seed=2"],
    "train-seed-3": ["train.seed=3"],
    # One timestep instead of two (the README's `dvc metrics diff`)
    "t50": ["timesteps=[50]"],
    # Baselines and the pretraining-compute table
    "pixels": ["train.features=pixels"],
    "random-init": ["pretrain.steps=0", "pretrain.vae_steps=0"],
    "unet-random": ["pretrain.steps=0"],
    "pretrain-1500": ["pretrain.steps=1500"],
    "masked-500": ["pretrain.objective=masked", "timesteps=[0]"],
    "masked-1500": ["pretrain.objective=masked", "pretrain.steps=1500", "timesteps=[0]"],
    # Lossy storage modes (bytes per image and timestep against mIoU)
    "int8": ["extract.storage=int8"],
    "pca-8": ["extract.storage=pca-8"],
    "pca-8-int8": ["extract.storage=pca-8-int8"],
    # Gong et al.'s prompting and DIFF's guided view (issue 33), all on one pretraining: the
    # scene prompt is the default, run again here beside the others with two more head seeds.
    "prompt-scene": [],
    "prompt-scene-seed-1": ["train.seed=1"],
    "prompt-scene-seed-2": ["train.seed=2"],
    "prompt-plain": ["prompts.variants=[plain]"],
    "prompt-random": [
        f"prompts.variants={RANDOMIZED}",
        f"train.train_variants={RANDOMIZED}",
    ],
    "prompt-random-consistency": [
        f"prompts.variants={RANDOMIZED}",
        f"train.train_variants={RANDOMIZED}",
        "train.consistency_weight=1.0",
    ],
    # DIFF's two views: the plain "" prompt and the guided class prompts, CE on both and the
    # MSE of their logits (encoder_decoder.py:278-302; train.guided_consistency_weight 1.0)
    "diff-guided": ["prompts.variants=[plain,guided]", "train.guided_weight=1.0"],
    # Test-time prompt tuning (tune_prompt): a second tuning seed, then 5x the steps on 4x the images
    "tune-seed-1": ["tune_prompt.seed=1"],
    "tune-50-steps-32-images": ["tune_prompt.steps=50", "tune_prompt.images=32"],
    "tune-50-steps-32-images-seed-1": [
        "tune_prompt.steps=50",
        "tune_prompt.images=32",
        "tune_prompt.seed=1",
    ],
    # CleanDIFT (issue 31): one pass on the clean latent at t = 261 (its t_init) instead of two
    # noisy timesteps, with the UNet as pretrained and after the cleandift stage (its loss and
    # heads; lr 1e-4 and 30 warm-up steps for 300 steps where CleanDIFT runs 1e-5 open-ended)
    "clean-pretrained": ["extract.noise_mode=clean", "timesteps=[261]"],
    "cleandift": [
        "extract.noise_mode=clean",
        "timesteps=[261]",
        "cleandift.steps=300",
        "cleandift.lr=0.0001",
        "cleandift.warmup=30",
        "model.unet=data/cleandift/unet",
    ],
    # Twice the UNet's width, its pretraining steps cut to the default's wall time
    "wider": [
        "model.small.unet_channels=[64,64,128,128]",
        "model.small.unet_heads=[2,2,4,4]",
        "pretrain.steps=238",  # a wider step costs 2.1x (measured): 500 / 2.1
    ],
}
# Two more head seeds of each prompting row (the table averages what it finds)
for _name in ("prompt-plain", "prompt-random", "prompt-random-consistency", "diff-guided"):
    for _seed in (1, 2):
        EXPERIMENTS[f"{_name}-seed-{_seed}"] = [*EXPERIMENTS[_name], f"train.seed={_seed}"]
# Experiments run up to tune_prompt (the others stop at evaluate: their tuned.json is the baseline's)
TUNED = {"prompt-scene"} | {name for name in EXPERIMENTS if name.startswith("tune-")}
METRIC_FILES = {
    "metrics/scores.json": "scores",
    "metrics/tuned.json": "tuned",
    "metrics/train.json": "train",
    "metrics/encode.json": "encode",
    "metrics/invert.json": "invert",
    "metrics/pretrain.json": "pretrain",
    "metrics/cleandift.json": "cleandift",
    "dvclive/train/metrics.json": "train_live",
}


def command(name: str) -> list[str]:
    """The `dvc exp run` of one experiment, as the README quotes it."""
    return [
        "dvc",
        "exp",
        "run",
        "--queue",
        "-n",
        name,
        *(a for s in EXPERIMENTS[name] for a in ("-S", s)),
        "tune_prompt" if name in TUNED else "evaluate",
    ]


def queue(names: list[str]) -> None:
    for name in names:
        print(" ".join(command(name)), flush=True)
        subprocess.run(command(name), cwd=ROOT, check=True)


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _files(data: dict, kind: str) -> dict[str, dict]:
    return {path: (entry.get("data") or {}) for path, entry in (data.get(kind) or {}).items()}


def export(refresh_default: bool) -> None:
    run = Run()
    shown = json.loads(
        subprocess.run(
            ["dvc", "exp", "show", "--json", "--all-commits"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    found: dict[str, dict] = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            if (exp.get("executor") or {}).get("state", "success") != "success":
                continue  # queued, running or failed: its metrics are not its own yet
            for rev in exp.get("revs") or []:
                if rev.get("name") in EXPERIMENTS and not rev.get("error"):
                    found.setdefault(rev["name"], {"rev": rev["rev"], "data": rev["data"]})
    committed = json.loads(RESULTS.read_text())["experiments"] if RESULTS.exists() else {}
    out = {n: e for n, e in committed.items() if n in EXPERIMENTS and n not in found}
    if out:
        print(f"experiments: kept as committed (not in this clone): {sorted(out)}")
    # Experiments not (yet) run stay visible: the tables print them as "not run" rows.
    missing = sorted(set(EXPERIMENTS) - set(found) - set(out))
    if missing:
        print(f"experiments: not run yet (queue them and export again): {missing}")
    for name, hit in found.items():
        metrics = {
            METRIC_FILES[p]: d
            for p, d in _files(hit["data"], "metrics").items()
            if p in METRIC_FILES and (p != "metrics/tuned.json" or name in TUNED)
        }
        extract = {
            p.split("/")[-1].removesuffix(".json"): d
            for p, d in _files(hit["data"], "metrics").items()
            if p.startswith("metrics/extract/")
        }
        params = _flatten(_files(hit["data"], "params").get("params.yaml", {}))
        out[name] = {
            "command": " ".join(command(name)),
            "overrides": EXPERIMENTS[name],
            "rev": hit["rev"],
            "params": {k: params.get(k) for k in _changed_keys(EXPERIMENTS[name])},
            "metrics": {**metrics, "extract": extract},
        }
    if "default" in committed and not refresh_default:
        out["default"] = committed["default"]
        print("experiments: default kept as committed (--default takes this checkout's metrics)")
        run.write(RESULTS, {"experiments": dict(sorted(out.items())), "not_run": missing})
        return
    # The default itself: this checkout's `dvc repro` (its metric files).
    default = {METRIC_FILES[p]: json.loads((ROOT / p).read_text()) for p in METRIC_FILES}
    extract = {
        p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "metrics/extract").glob("*.json"))
    }
    out["default"] = {
        "command": "dvc repro",
        "overrides": [],
        "rev": run.commit,
        "params": {},
        "metrics": {**default, "extract": extract},
    }
    run.write(RESULTS, {"experiments": dict(sorted(out.items())), "not_run": missing})


def _changed_keys(overrides: list[str]) -> list[str]:
    return [o.split("=", 1)[0] for o in overrides]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["queue", "export"])
    ap.add_argument("names", nargs="*", help="experiments to queue (default: all)")
    ap.add_argument(
        "--default",
        action="store_true",
        help="export: take the default's row from this checkout's metrics, not the committed one",
    )
    args = ap.parse_args()
    if args.what == "queue":
        unknown = sorted(set(args.names) - set(EXPERIMENTS))
        if unknown:
            sys.exit(f"experiments: error: unknown {unknown} (known: {sorted(EXPERIMENTS)})")
        queue(args.names or list(EXPERIMENTS))
    else:
        export(args.default)


if __name__ == "__main__":
    main()
