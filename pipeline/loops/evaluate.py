"""The evaluate loop: every domain's val split scored over the whole split, with plots."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import numpy as np
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch.utils.data import Dataset

from pipeline.cache.encoded import encoded_resolution, read_index, source_domain, target_domains
from pipeline.cache.preload import preload
from pipeline.cache.reader import FeatureDataset, select_indices
from pipeline.cache.store import store_path
from pipeline.core.device import peak_rss_mb, resolve_device, set_threads
from pipeline.core.fileio import write_csv, write_json
from pipeline.core.params import STRICT
from pipeline.data.images import load_image
from pipeline.data.pixels import PixelDataset
from pipeline.heads.inference import Inference, evaluate_dataset
from pipeline.heads.model import SegModel
from pipeline.loops.plots import confusion_png, iou_bars, iou_rows, overlay_grid

Positive = Annotated[int, Field(ge=1)]
Pair = Annotated[list[Positive], Field(min_length=2, max_length=2)]


@dataclass(config=STRICT)
class EvalConfig:
    """The `evaluate` group."""

    mode: Literal["whole", "slide"]
    window: Pair  # slide: window and stride in image pixels (multiples of the largest stride)
    window_stride: Pair
    batch_size: Positive
    overlays: Annotated[int, Field(ge=0)]  # images per domain in the overlay grid
    num_workers: Annotated[int, Field(ge=0)]
    device: str  # auto = cuda when available, else cpu
    threads: Annotated[int, Field(ge=0)]  # torch CPU threads; 0 = torch's default

    def inference(self) -> Inference:
        return Inference(self.mode, self.window, self.window_stride, self.batch_size,
                         self.num_workers)  # fmt: skip


@dataclasses.dataclass
class DomainResult:
    """Scores, confusion matrix and a few predictions of one domain."""

    scores: dict
    confusion: np.ndarray
    samples: list[dict]  # {"index", "label", "pred"} (H, W) numpy


def evaluate_domains(
    model: SegModel,
    datasets: dict[str, Dataset],
    cfg: EvalConfig,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, DomainResult]:
    """Evaluate each named domain's split."""
    results = {}
    for name, ds in datasets.items():
        meter, samples = evaluate_dataset(
            model, ds, cfg.inference(), device, max(cfg.overlays, 1), progress, name
        )
        results[name] = DomainResult(meter.scores(), meter.matrix, samples[: cfg.overlays])
    return results


def run(
    cfg: EvalConfig,
    timesteps: list[int],
    encoded_dir: str,
    features_dir: str,
    heads_dir: str,
    metrics_path: str,
    plots_dir: str,
) -> dict[str, dict]:
    """The evaluate stage: source val first, then every other domain's val split."""
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model = SegModel.from_pretrained(heads_dir, device=device)
    index = read_index(encoded_dir)
    resolution = encoded_resolution(encoded_dir)
    domains = [source_domain(index), *target_domains(index)]
    rows = {d: select_indices(index, d, "val") for d in domains}
    if model.fusion_config.kind == "pixels":
        datasets = {d: PixelDataset(index, r, resolution) for d, r in rows.items() if r}
    else:
        paths = [store_path(features_dir, t) for t in timesteps]
        datasets = {
            d: FeatureDataset(paths, r, encoded_dir=encoded_dir) for d, r in rows.items() if r
        }
    datasets = {d: preload(ds) for d, ds in datasets.items()}
    results = evaluate_domains(model, datasets, cfg, device)
    scores = {name: r.scores for name, r in results.items()}
    write_json(metrics_path, scores)
    # One file per domain: `dvc plots` draws a directory as one bar chart per file.
    for domain in scores:
        write_csv(
            iou_rows({domain: scores[domain]}),
            f"{plots_dir}/iou/{domain}.csv",
            ["domain", "class", "IoU"],
        )
    figures = f"{plots_dir}/figures"
    iou_bars(scores, f"{figures}/iou.png")
    for name, r in results.items():
        confusion_png(
            r.confusion, f"{figures}/confusion_{name}.png", f"{name}: confusion (row-normalized)"
        )
        if r.samples:
            images = [
                ((load_image(index.iloc[s["index"]]["image"], resolution) + 1) * 127.5)
                .round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
                for s in r.samples
            ]  # fmt: skip
            overlay_grid(
                images,
                [s["label"] for s in r.samples],
                [s["pred"] for s in r.samples],
                f"{figures}/overlays_{name}.png",
                f"{name} (mIoU {r.scores['mIoU']:.1f})",
            )
    summary = ", ".join(f"{d} mIoU {s['mIoU']}" for d, s in scores.items())
    print(f"evaluate: {summary}; peak RSS {peak_rss_mb():.0f} MB")
    return scores
