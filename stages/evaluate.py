"""DVC stage evaluate: per-domain scores of the trained head -> metrics/evaluate.json + plots."""

from __future__ import annotations

import argparse
import resource

import _checkout  # noqa: F401  (this checkout's pipeline/, see stages/_checkout.py)

from pipeline.baselines import PixelDataset, load_image
from pipeline.device import resolve_device, set_threads
from pipeline.encoded import read_index
from pipeline.errors import run_stage
from pipeline.evaluate import EvalConfig, evaluate_domains, metrics_json
from pipeline.fileio import write_json
from pipeline.heads import SegModel
from pipeline.params import from_dict, load_params
from pipeline.plots import confusion_png, iou_bars, iou_rows, overlay_grid, write_csv
from pipeline.preload import preload
from pipeline.reader import FeatureDataset, select_indices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--features", default="data/features")
    ap.add_argument("--encoded", default="data/encoded")
    ap.add_argument("--heads", default="data/heads")
    ap.add_argument("--metrics", default="metrics/evaluate.json")
    ap.add_argument("--plots", default="plots/evaluate")
    args = ap.parse_args()
    params = load_params(args.params)
    cfg = from_dict(EvalConfig, params["evaluate"])
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model = SegModel.from_pretrained(args.heads, device=device)
    index = read_index(args.encoded)
    source = params["data"]["source"]["domain"]
    # Source val first, then every other domain's val split (the targets).
    domains = [source] + sorted(set(index["domain"]) - {source})
    rows = {d: select_indices(index, d, "val") for d in domains}
    res = params["encode"]["resolution"]
    if model.fusion_config.kind == "pixels":
        datasets = {d: PixelDataset(index, r, res) for d, r in rows.items() if r}
    else:
        paths = [f"{args.features}/t{int(t)}" for t in params["extract"]["timesteps"]]
        datasets = {
            d: FeatureDataset(paths, r, encoded_dir=args.encoded) for d, r in rows.items() if r
        }

    datasets = {d: preload(ds) for d, ds in datasets.items()}
    results = evaluate_domains(model, datasets, cfg, device)
    scores = metrics_json(results)
    write_json(args.metrics, scores)
    # One file per domain: `dvc plots` draws a directory as one bar chart per file.
    for domain in scores:
        rows = iou_rows({domain: scores[domain]})
        write_csv(rows, f"{args.plots}/iou/{domain}.csv", ["domain", "class", "IoU"])
    figures = f"{args.plots}/figures"
    iou_bars(scores, f"{figures}/iou.png")
    for name, r in results.items():
        confusion_png(
            r.confusion, f"{figures}/confusion_{name}.png", f"{name}: confusion (row-normalized)"
        )
        if r.samples:
            images = [
                ((load_image(index.iloc[s["index"]]["image"], res) + 1) * 127.5)
                .round()
                .clamp(0, 255)
                .byte()
                .permute(1, 2, 0)
                .numpy()
                for s in r.samples
            ]
            overlay_grid(
                images,
                [s["label"] for s in r.samples],
                [s["pred"] for s in r.samples],
                f"{figures}/overlays_{name}.png",
                f"{name} (mIoU {r.scores['mIoU']:.1f})",
            )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = ", ".join(f"{d} mIoU {s['mIoU']}" for d, s in scores.items())
    print(f"evaluate: {summary}; peak RSS {peak_mb:.0f} MB")


if __name__ == "__main__":
    run_stage("evaluate", main)
