"""DVC stage pretrain: train the small model text-to-image on all domains' unlabeled images.

Usage: python stages/pretrain.py [--params params.yaml] [--model-init data/model_init]
       [--manifests data/manifests] [--out data/model] [--plots plots/pretrain]
       [--metrics metrics/pretrain.json]
A pointer to an external model (model.source: a folder) is passed through untrained.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import _checkout  # noqa: F401  (this checkout's pipeline/, see stages/_checkout.py)

from pipeline.device import set_threads
from pipeline.diffusion import load_diffusion_model, resolve_model_folder, save_diffusion_model
from pipeline.errors import DataError, run_stage
from pipeline.fileio import atomic_path, write_json
from pipeline.params import from_dict, load_params
from pipeline.pretrain import PretrainConfig, load_images, pretrain, write_plots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model-init", default="data/model_init")
    ap.add_argument("--manifests", default="data/manifests")
    ap.add_argument("--out", default="data/model")
    ap.add_argument("--plots", default="plots/pretrain")
    ap.add_argument("--metrics", default="metrics/pretrain.json")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    params = load_params(args.params)
    cfg = from_dict(PretrainConfig, params["pretrain"])
    set_threads(cfg.threads)
    resolution = params["encode"]["resolution"]

    model = load_diffusion_model(args.model_init)
    _, pinned = resolve_model_folder(args.model_init)
    if pinned is not None:
        # An external model (SD-2.1) is used as it is: copy the pointer, train nothing.
        with atomic_path(args.out) as tmp:
            shutil.copytree(args.model_init, tmp)
        write_plots(model, None, None, [], cfg, args.plots)
        write_json(args.metrics, {"trained": False, "fingerprint": model.fingerprint})
        return 0

    manifests = sorted(Path(args.manifests).glob("*.parquet"))
    if not manifests:
        raise DataError(f"{args.manifests}: no manifests (*.parquet); run prepare")
    images, domains = load_images(manifests, resolution)
    log = pretrain(model, images, domains, cfg)
    fp = save_diffusion_model(model, args.out)
    write_plots(model, log, images, domains, cfg, args.plots)
    metrics = {"trained": True, "fingerprint": fp, "images": len(images), **log.metrics(model)}
    metrics["seconds"]["total"] = round(time.perf_counter() - start, 1)
    write_json(args.metrics, metrics)
    print(
        f"pretrain: {len(images)} images, {cfg.steps} steps -> {args.out} ({fp}), "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    run_stage("pretrain", main)
