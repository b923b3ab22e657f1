"""Training losses: cross-entropy at label size, consistency between prompt variants (Gong et
al.), and DIFF's guided path (CE on both paths + MSE between their logits)."""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.core.classes import IGNORE_INDEX
from pipeline.heads.blocks import resize


@dataclasses.dataclass(frozen=True)
class ViewLoss:
    """Weights of the prompt-variant terms (from the train group)."""

    consistency_weight: float  # 0: no consistency pair among the views
    consistency: str  # kl (symmetric KL of the softmaxes) | mse (on logits)
    guided_weight: float  # 0: no guided view
    guided_consistency_weight: float  # DIFF: 1.0
    ce_average: str = "all"  # all (mmseg's, DIFF's) | valid (labeled pixels only)


def segmentation_ce(logits: Tensor, label: Tensor, average: str = "all") -> Tensor:
    """Cross-entropy with logits upsampled (bilinear) to the label size, 255 ignored. `all`
    averages over every pixel, ignored ones counting 0, as mmseg 0.x (DIFF:
    mmseg/models/losses/cross_entropy_loss.py:11-33, losses/utils.py:48-77 `weight_reduce_loss`
    takes loss.mean()); `valid` over the labeled pixels only (torch's own reduction)."""
    per_pixel = F.cross_entropy(
        resize(logits.float(), label.shape[-2:]),
        label.long(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    if average == "all":
        return per_pixel.mean()
    if average == "valid":
        return per_pixel.sum() / (label != IGNORE_INDEX).sum().clamp_min(1)
    raise ValueError(f"unknown cross-entropy average {average!r} (all | valid)")


def consistency_loss(
    logits_a: Tensor, logits_b: Tensor, kind: str = "kl", valid: Tensor | None = None
) -> Tensor:
    """Disagreement of two predictions (B, K, h, w): symmetric KL of the softmaxes or logit MSE.

    `valid` (B, h, w) bool restricts the mean to some pixels (e.g. not-ignore); default all.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"consistency: shapes differ {logits_a.shape} vs {logits_b.shape}")
    if kind == "mse":
        per_pixel = (logits_a - logits_b).pow(2).mean(dim=1)
    elif kind == "kl":
        log_a, log_b = F.log_softmax(logits_a, dim=1), F.log_softmax(logits_b, dim=1)
        kl_ab = (log_a.exp() * (log_a - log_b)).sum(dim=1)
        kl_ba = (log_b.exp() * (log_b - log_a)).sum(dim=1)
        per_pixel = 0.5 * (kl_ab + kl_ba)
    else:
        raise ValueError(f"unknown consistency loss {kind!r} (kl | mse)")
    if valid is None:
        return per_pixel.mean()
    valid = valid.to(per_pixel.dtype)
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)


def views_loss(
    model: nn.Module, features: dict[str, Tensor], label: Tensor, cfg: ViewLoss
) -> tuple[Tensor, dict[str, float]]:
    """Loss of a batch of training samples (features (B, V, C, h, w), label (B, H, W)).

    Each view is its own forward pass, as DIFF runs its plain and guided views
    (encoder_decoder.py:278-297): BatchNorm normalizes each view by its own statistics.
    CE on view 0; with a consistency pair, + CE on view 1 + `consistency_weight` x
    consistency(view 0, view 1); with the guided view last, + `guided_weight` x (CE(guided) +
    `guided_consistency_weight` x MSE(view 0 logits, guided logits)), as DIFF's
    path-controlled loss (both paths get gradients).
    """
    k = next(iter(features.values())).shape[1]
    logits = [model({key: v[:, i] for key, v in features.items()}).float() for i in range(k)]
    ce0 = segmentation_ce(logits[0], label, cfg.ce_average)
    total, parts = ce0, {"ce": float(ce0.detach())}
    view = 1
    if cfg.consistency_weight > 0:
        ce1 = segmentation_ce(logits[1], label, cfg.ce_average)
        cons = consistency_loss(logits[0], logits[1], cfg.consistency)
        total = total + ce1 + cfg.consistency_weight * cons
        parts.update(ce_pair=float(ce1.detach()), consistency=float(cons.detach()))
        view = 2
    if cfg.guided_weight > 0 and k > view:
        ce_g = segmentation_ce(logits[view], label, cfg.ce_average)
        mse = F.mse_loss(logits[0], logits[view])
        total = total + cfg.guided_weight * (ce_g + cfg.guided_consistency_weight * mse)
        parts.update(ce_guided=float(ce_g.detach()), guided_mse=float(mse.detach()))
    return total, parts
