"""Inference per domain (whole image or sliding window in feature space) and split-level scores."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.errors import ModelError
from pipeline.heads import SegModel
from pipeline.metrics import ConfusionMeter


@dataclass
class EvalConfig:
    """The `evaluate` params group."""

    mode: str = "whole"  # whole | slide
    window: list[int] = field(default_factory=lambda: [128, 128])  # slide: [h, w] image pixels
    window_stride: list[int] = field(default_factory=lambda: [64, 64])
    batch_size: int = 8
    overlays: int = 4  # images per domain in the overlay grid
    num_workers: int = 0
    device: str = "auto"  # auto = cuda when available, else cpu
    threads: int = 1  # CPU threads for torch; 0 = torch's default


@dataclass
class DomainResult:
    """Scores, confusion matrix and a few predictions of one domain."""

    scores: dict
    confusion: np.ndarray
    samples: list[dict] = field(default_factory=list)  # {"index", "label", "pred"} (H, W) numpy


def predict_logits(
    model: SegModel,
    features: dict[str, torch.Tensor],
    size: tuple[int, int],
    mode: str = "whole",
    window: list[int] | None = None,
    window_stride: list[int] | None = None,
) -> torch.Tensor:
    """Logits (B, K, H, W) at label size; `slide` averages windows cut from the feature maps."""
    if mode == "whole":
        return _upsample(model(features), size)
    if mode != "slide":
        raise ModelError(f"unknown evaluate mode {mode!r} (whole | slide)")
    H, W = size
    strides = {k: H // v.shape[-2] for k, v in features.items()}
    top = max(strides.values())
    wh, ww = min(window[0], H), min(window[1], W)
    sh, sw = window_stride
    if wh % top or ww % top or sh % top or sw % top:
        raise ModelError(f"window {window} / stride {window_stride} must be multiples of {top}")
    ys = _starts(H, wh, sh)
    xs = _starts(W, ww, sw)
    out = None
    count = torch.zeros(1, 1, H, W)
    for y0 in ys:
        for x0 in xs:
            crop = {
                k: v[
                    ...,
                    y0 // strides[k] : (y0 + wh) // strides[k],
                    x0 // strides[k] : (x0 + ww) // strides[k],
                ]
                for k, v in features.items()
            }
            logits = _upsample(model(crop), (wh, ww))
            if out is None:
                out = logits.new_zeros(logits.shape[0], logits.shape[1], H, W)
                count = count.to(logits.device)
            out[..., y0 : y0 + wh, x0 : x0 + ww] += logits
            count[..., y0 : y0 + wh, x0 : x0 + ww] += 1
    return out / count


@torch.no_grad()
def evaluate_dataset(
    model: SegModel,
    dataset: Dataset,
    cfg: EvalConfig | None = None,
    device: str = "cpu",
    keep: int = 0,
    progress: bool = True,
    desc: str = "evaluate",
) -> ConfusionMeter | tuple[ConfusionMeter, list[dict]]:
    """Confusion over the whole dataset; with keep > 0 also the first `keep` predictions."""
    cfg = cfg or EvalConfig()
    model.eval()
    meter = ConfusionMeter(model.head_config.num_classes)
    samples: list[dict] = []
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    use_amp = torch.device(device).type == "cuda"
    for batch in tqdm(loader, desc=desc, disable=not progress):
        feats = {k: v.to(device, torch.float32) for k, v in batch["features"].items()}
        label = batch["label"]
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits = predict_logits(
                model, feats, tuple(label.shape[-2:]), cfg.mode, cfg.window, cfg.window_stride
            )
        pred = logits.float().argmax(1).cpu()
        meter.update(pred, label)
        for i in range(min(keep - len(samples), len(pred))):
            samples.append(
                {
                    "index": int(batch["index"][i]),
                    "label": label[i].numpy().astype(np.uint8),
                    "pred": pred[i].numpy().astype(np.uint8),
                }
            )
    return (meter, samples) if keep else meter


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
            model, ds, cfg, device, keep=max(cfg.overlays, 1), progress=progress, desc=name
        )
        results[name] = DomainResult(meter.scores(), meter.matrix, samples[: cfg.overlays])
    return results


def metrics_json(results: dict[str, DomainResult]) -> dict:
    """The DESIGN.md §3 contract: {domain: {"mIoU", "aAcc", "IoU": {class: value|null}}}."""
    return {name: r.scores for name, r in results.items()}


def _upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def _starts(total: int, win: int, stride: int) -> list[int]:
    starts = list(range(0, max(total - win, 0) + 1, stride))
    if starts[-1] + win < total:
        starts.append(total - win)  # a last window flush with the border (still stride-aligned)
    return starts
