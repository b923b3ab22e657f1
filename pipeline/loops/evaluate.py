"""The evaluate loop: every domain's val split scored over the whole split, with plots."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch.utils.data import Dataset

from pipeline.cache.encoded import (
    encoded_resolution,
    read_index,
    set_index,
    source_domain,
    split_rows,
    target_domains,
)
from pipeline.cache.preload import LoaderConfig, within_budget
from pipeline.cache.reader import FeatureReader
from pipeline.cache.store import store_path
from pipeline.core.classes import TRAIN_ID_TO_LABEL_ID, colorize
from pipeline.core.device import peak_rss_mb, resolve_device, set_threads
from pipeline.core.errors import DataError
from pipeline.core.fileio import atomic_path, write_csv, write_json
from pipeline.core.params import STRICT
from pipeline.data.images import load_image, read_train_ids, write_png
from pipeline.data.pixel_reader import PixelReader
from pipeline.data.samples import Reader, RowsDataset
from pipeline.heads.inference import Inference, Originals, evaluate_dataset
from pipeline.heads.seg_model import SegModel
from pipeline.reporting.plots import confusion_png, iou_bars, iou_rows, overlay_grid

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
    save_predictions: bool  # per-image labelIds and color PNGs under data/predictions/<domain>
    device: str  # auto = cuda when available, else cpu
    threads: Annotated[int, Field(ge=0)]  # torch CPU threads; 0 = torch's default

    def inference(self, loading: LoaderConfig) -> Inference:
        return Inference(
            self.mode,
            self.window,
            self.window_stride,
            self.batch_size,
            loading.workers,
            loading.prefetch,
        )


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
    loading: LoaderConfig,
    device: str = "cpu",
    progress: bool = True,
    originals: dict[str, Originals] | None = None,
    sinks: dict[str, Callable[[int, np.ndarray], None]] | None = None,
) -> dict[str, DomainResult]:
    """Evaluate each named domain's split (at label resolution when `originals` are given)."""
    results = {}
    for name, ds in datasets.items():
        meter, samples = evaluate_dataset(
            model,
            ds,
            cfg.inference(loading),
            device,
            max(cfg.overlays, 1),
            progress,
            name,
            (originals or {}).get(name),
            (sinks or {}).get(name),
        )
        results[name] = DomainResult(meter.scores(), meter.matrix, samples[: cfg.overlays])
    return results


def label_reader(rows: pd.DataFrame) -> Originals:
    """A domain's original labels (prepared train ids at full size) and content sizes, by row."""

    def original(row: int) -> tuple[np.ndarray, tuple[int, int]]:
        r = rows.iloc[row]
        label = read_train_ids(r["label"], r["label_sha256"])
        if label.shape != (int(r["height"]), int(r["width"])):
            raise DataError(
                f"{r['label']}: label is {label.shape}, the index says "
                f"{(int(r['height']), int(r['width']))}"
            )
        return label, (int(r["content_h"]), int(r["content_w"]))

    return original


def prediction_writer(rows: pd.DataFrame, out_dir: Path) -> Callable[[int, np.ndarray], None]:
    """Writes each prediction as Cityscapes labelIds and color PNGs named after its image."""

    def write(row: int, pred: np.ndarray) -> None:
        stem = Path(rows.iloc[row]["image"]).name.split(".")[0].removesuffix("_leftImg8bit")
        for kind, image in (("labelIds", TRAIN_ID_TO_LABEL_ID[pred]), ("color", colorize(pred))):
            path = out_dir / kind / f"{stem}_{kind}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_png(path, image)

    return write


def run(
    cfg: EvalConfig,
    loading: LoaderConfig,
    timesteps: list[int],
    encoded_dir: str,
    features_dir: str,
    heads_dir: str,
    results_path: str,
    metrics_path: str,
    plots_dir: str,
    predictions_dir: str,
) -> dict[str, dict]:
    """The evaluate stage: source val first, then every other domain's val split, each scored
    at its original label resolution. `results_path` gets the full scores (metrics/
    evaluate.json's contract, per-class IoU included), `metrics_path` what one compares across
    experiments: mIoU and aAcc per domain."""
    set_threads(cfg.threads)
    device = resolve_device(cfg.device, "evaluate.device")
    model = SegModel.from_pretrained(heads_dir, device=device)
    index = read_index(encoded_dir)
    domains = [source_domain(index), *target_domains(index)]
    readers: dict[str, tuple[Reader, list[int]]] = {}
    originals, sinks, rows_of = {}, {}, {}
    keys = list(model.input_specs)
    with atomic_path(predictions_dir) as predictions:
        predictions.mkdir()
        for d in domains:
            found = split_rows(index, d, "val")
            if found is None:
                continue  # e.g. a source trained on all its images (DIFF's GTA5)
            name, rows = found
            rows_of[d] = set_index(index, name)
            canvas = encoded_resolution(encoded_dir, name)
            if model.fusion_config.kind == "pixels":
                readers[d] = PixelReader(rows_of[d], canvas), rows
            else:
                paths = [store_path(features_dir, t, name) for t in timesteps]
                reader = FeatureReader(
                    paths,
                    encoded_dir=encoded_dir,
                    set_name=name,
                    keys=keys,
                    threads=loading.read_threads,
                )
                readers[d] = reader, rows
            originals[d] = label_reader(rows_of[d])
            if cfg.save_predictions:
                sinks[d] = prediction_writer(rows_of[d], predictions / d)
        # One domain at a time in memory at most: each is scored before the next loads.
        results = {}
        for d, (reader, rows) in readers.items():
            if model.fusion_config.kind != "pixels":
                reader = within_budget(reader, rows, [0], loading, f"{d} val split")
            results |= evaluate_domains(
                model, {d: RowsDataset(reader, rows)}, cfg, loading, device, True, originals, sinks
            )
            del reader
    scores = {name: r.scores for name, r in results.items()}
    write_json(results_path, scores)
    write_json(metrics_path, {d: {"mIoU": s["mIoU"], "aAcc": s["aAcc"]} for d, s in scores.items()})
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
            canvas = encoded_resolution(encoded_dir, str(rows_of[name]["set"].iloc[0]))
            images = [
                ((load_image(rows_of[name].iloc[s["index"]]["image"], canvas) + 1) * 127.5)
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
    summary = ", ".join(f"{d} mIoU {s['mIoU']}" for d, s in scores.items())
    print(f"evaluate: {summary}; peak RSS {peak_rss_mb():.0f} MB")
    return scores
