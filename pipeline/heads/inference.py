"""Inference (whole image or sliding window in feature space) and the confusion over a split."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.core.device import data_loader
from pipeline.core.errors import ModelError
from pipeline.data.samples import collate, to_device
from pipeline.heads.blocks import resize
from pipeline.heads.metrics import ConfusionMeter
from pipeline.heads.seg_model import SegModel


@dataclasses.dataclass(frozen=True)
class Inference:
    """How a split's logits are computed: whole images or windows (image pixels), and the batch."""

    mode: str  # whole | slide
    window: list[int] | None
    window_stride: list[int] | None
    batch_size: int
    workers: int  # DataLoader worker processes
    prefetch: int  # batches each worker reads ahead


# Source-val scoring during training: whole images, as the default's evaluation.
WHOLE = Inference("whole", None, None, batch_size=8, workers=0, prefetch=2)


def predict_logits(
    model: SegModel, features: dict[str, torch.Tensor], size: tuple[int, int], how: Inference
) -> torch.Tensor:
    """Logits (B, K, H, W) at label size; `slide` averages windows cut from the feature maps."""
    if how.mode == "whole":
        return resize(model(features).float(), size)
    if how.mode != "slide":
        raise ModelError(f"unknown evaluate mode {how.mode!r} (whole | slide)")
    H, W = size
    strides = {k: H // v.shape[-2] for k, v in features.items()}
    top = max(strides.values())
    wh, ww = min(how.window[0], H), min(how.window[1], W)
    sh, sw = how.window_stride
    if wh % top or ww % top or sh % top or sw % top:
        raise ModelError(
            f"window {how.window} / stride {how.window_stride} must be multiples of {top}"
        )
    out = None
    count = torch.zeros(1, 1, H, W)
    for y0 in _starts(H, wh, sh):
        for x0 in _starts(W, ww, sw):
            crop = {
                k: v[
                    ...,
                    y0 // strides[k] : (y0 + wh) // strides[k],
                    x0 // strides[k] : (x0 + ww) // strides[k],
                ]
                for k, v in features.items()
            }
            logits = resize(model(crop).float(), (wh, ww))
            if out is None:
                out = logits.new_zeros(logits.shape[0], logits.shape[1], H, W)
                count = count.to(logits.device)
            out[..., y0 : y0 + wh, x0 : x0 + ww] += logits
            count[..., y0 : y0 + wh, x0 : x0 + ww] += 1
    return out / count


# An image's original label and the (h, w) its content covers on the canvas (the rest: padding).
Originals = Callable[[int], tuple[np.ndarray, tuple[int, int]]]


@torch.no_grad()
def evaluate_dataset(
    model: SegModel,
    dataset: Dataset,
    how: Inference = WHOLE,
    device: str = "cpu",
    keep: int = 0,
    progress: bool = True,
    desc: str = "evaluate",
    originals: Originals | None = None,
    sink: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[ConfusionMeter, list[dict]]:
    """Confusion over the dataset, and its first `keep` predictions {"index", "label", "pred"}.

    With `originals`, each image is scored at its original label resolution, as mmseg and
    the papers do: logits at the canvas, the padding cut off, upsampled (bilinear) to the
    label's size; `sink(index, prediction)` then receives each prediction at that size.
    Without, images are scored at the canvas against the dataset's labels.
    """
    model.eval()
    meter = ConfusionMeter(model.head_config.num_classes)
    samples: list[dict] = []
    loader = data_loader(
        dataset, device, how.workers, how.prefetch, batch_size=how.batch_size, collate_fn=collate
    )
    for batch in tqdm(loader, desc=desc, disable=not progress):
        feats = to_device(batch.features, device)  # int8 decoded there
        label = batch.label
        logits = predict_logits(model, feats, tuple(label.shape[-2:]), how)  # fp32, as DIFF
        pred = logits.float().argmax(1).cpu()
        for i in range(len(pred)):
            index = int(batch.index[i])
            if originals is None:
                meter.update(pred[i], label[i])
                continue
            original, (h, w) = originals(index)
            # One image at a time: logits at 2048x1024 are 160 MB per image.
            full = resize(logits[i : i + 1, :, :h, :w].float(), original.shape)
            scored = full.argmax(1)[0].cpu()
            meter.update(scored, torch.from_numpy(original.astype(np.int64)))
            if sink is not None:
                sink(index, scored.numpy().astype(np.uint8))
        for i in range(min(keep - len(samples), len(pred))):
            samples.append(
                {
                    "index": int(batch.index[i]),
                    "label": label[i].numpy().astype(np.uint8),
                    "pred": pred[i].numpy().astype(np.uint8),
                }
            )
    return meter, samples


def _starts(total: int, win: int, stride: int) -> list[int]:
    starts = list(range(0, max(total - win, 0) + 1, stride))
    if starts[-1] + win < total:
        starts.append(total - win)  # a last window flush with the border (still stride-aligned)
    return starts
