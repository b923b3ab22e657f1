"""DVC stage train: fusion + head from the cached features (or from pixels) -> data/heads/."""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys

import _checkout  # noqa: F401  (this checkout's pipeline/, see stages/_checkout.py)
import torch

from pipeline.baselines import PixelDataset
from pipeline.consistency import VariantViews, resolve_variants
from pipeline.device import resolve_device, set_threads
from pipeline.encoded import open_labels, read_index
from pipeline.errors import run_stage
from pipeline.fileio import write_json
from pipeline.params import from_dict, load_params
from pipeline.plots import curve_png, write_csv
from pipeline.preload import preload
from pipeline.prompts import PromptConfig, variant_prompts
from pipeline.reader import FeatureDataset, select_indices, tap_specs
from pipeline.store import FeatureStore
from pipeline.train import (
    TrainConfig,
    class_pixel_counts,
    clear_checkpoint,
    prompt_loss_config,
    train,
)


def store_paths(features_dir: str, timesteps: list[int]) -> list[str]:
    return [f"{features_dir}/t{int(t)}" for t in timesteps]


def data_fingerprint(paths: list[str], extra: object) -> str:
    """Hash of what the inputs' values depend on: a checkpoint of other data is never resumed."""
    ids = [FeatureStore.open(p).identity.to_attrs() for p in paths]
    return hashlib.sha256(json.dumps([ids, extra], sort_keys=True).encode()).hexdigest()


def prompt_views(train_set: FeatureDataset, cfg: TrainConfig, params: dict, store: str):
    """Wrap the reader for prompt randomization / consistency / DIFF's guided path when on."""
    loss_cfg = prompt_loss_config(cfg)
    guided = loss_cfg.guided_weight > 0
    if not (loss_cfg.train_variants or loss_cfg.consistency_weight > 0 or guided):
        return train_set
    identity = FeatureStore.open(store).identity
    texts = variant_prompts(from_dict(PromptConfig, params.get("prompts", {})))
    names = loss_cfg.train_variants or [next(iter(texts))]
    stored = list(identity.prompts)
    variants = resolve_variants(names, texts, stored, identity.draws)
    guided_index = None
    if guided:
        guided_index = resolve_variants(["guided"], texts, stored, 1)[0] * identity.draws
    return VariantViews(train_set, variants, loss_cfg, guided_index)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--features", default="data/features")
    ap.add_argument("--encoded", default="data/encoded")
    ap.add_argument("--out", default="data/heads")
    ap.add_argument("--work", default="data/train_checkpoint", help="checkpoints (resume)")
    ap.add_argument("--metrics", default="metrics/train.json")
    ap.add_argument("--plots", default="plots/train")
    args = ap.parse_args()
    params = load_params(args.params)
    cfg = from_dict(TrainConfig, params["train"])
    set_threads(cfg.threads)
    source = params["data"]["source"]["domain"]
    index = read_index(args.encoded)
    train_rows = select_indices(index, source, "train")
    val_rows = select_indices(index, source, "val")
    if cfg.features == "pixels":
        res = params["encode"]["resolution"]
        train_set, val_set = (
            PixelDataset(index, train_rows, res),
            PixelDataset(index, val_rows, res),
        )
        specs: dict[str, tuple[int, int]] = {}
        fingerprint = hashlib.sha256(
            json.dumps([list(index["sha256"]), list(res)]).encode()
        ).hexdigest()
    else:
        paths = store_paths(args.features, params["extract"]["timesteps"])
        specs = tap_specs(paths)
        train_set = FeatureDataset(paths, train_rows, encoded_dir=args.encoded)
        train_set = prompt_views(train_set, cfg, params, paths[0])
        val_set = FeatureDataset(paths, val_rows, encoded_dir=args.encoded)
        fingerprint = data_fingerprint(paths, train_rows)
    # Train from RAM: per-sample zarr reads would cost more than the training step.
    train_set, val_set = preload(train_set), preload(val_set)
    counts = None
    if cfg.rare_class_sampling:
        labels = open_labels(args.encoded)
        counts = class_pixel_counts(torch.from_numpy(labels[i]) for i in train_rows)

    device = resolve_device(cfg.device)
    result = train(
        cfg, train_set, specs, args.work, val_set, device, fingerprint, class_counts=counts
    )
    result.model.save_pretrained(args.out)
    write_csv(result.curve, f"{args.plots}/curve.csv", ["step", "loss", "lr"])
    write_csv(result.val, f"{args.plots}/val.csv", ["step", "mIoU", "aAcc"])
    curve_png(result.curve, result.val, f"{args.plots}/curve.png")
    final_val = result.val[-1] if result.val else {}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
        1 << 10 if sys.platform != "darwin" else 1 << 20
    )
    write_json(
        args.metrics,
        {
            "features": cfg.features,
            "iterations": result.iterations_done,
            "final_loss": result.curve[-1]["loss"] if result.curve else None,
            "source_val": {"mIoU": final_val.get("mIoU"), "aAcc": final_val.get("aAcc")},
            "seconds": round(result.seconds, 1),
            "seconds_per_iteration": round(result.seconds / max(result.iterations_done, 1), 4),
            "peak_rss_mb": round(peak_mb, 1),
            "device": device,
        },
    )
    clear_checkpoint(args.work)


if __name__ == "__main__":
    run_stage("train", main)
