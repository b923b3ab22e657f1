"""Training losses over prompt variants: randomization + consistency (Gong et al.), DIFF's guided path.

Features of every variant are cached (the V dimension of the store); these functions pick
variants per sample and compare the head's predictions under them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from pipeline.classes import IGNORE_INDEX
from pipeline.errors import StoreError


@dataclasses.dataclass
class PromptLossConfig:
    """Prompt options of head training (keys of the `train` group)."""

    # Variant names the head trains on (randomization draws among them); [] = the first variant.
    train_variants: list[str] = dataclasses.field(default_factory=list)
    consistency_weight: float = 0.0  # 0 disables the consistency loss between two variants
    consistency: str = "kl"  # kl (symmetric KL of softmax) | mse (on logits)
    pairing: str = "random"  # random: a second, different random variant | anchor: the first one
    guided_weight: float = 0.0  # 0 disables DIFF's guided path (CE on guided + MSE to plain)
    guided_consistency_weight: float = 1.0


def draw_variants(
    batch: int, variants: list[int], generator: torch.Generator | None = None
) -> Tensor:
    """One variant index (from `variants`) per sample: prompt randomization."""
    if not variants:
        raise ValueError("draw_variants: no variants to draw from")
    pool = torch.tensor(variants, dtype=torch.long)
    return pool[torch.randint(len(variants), (batch,), generator=generator)]


def pair_variants(
    first: Tensor, variants: list[int], pairing: str, generator: torch.Generator | None = None
) -> Tensor:
    """A second variant per sample: `anchor` = variants[0]; `random` = a different random one."""
    if pairing == "anchor":
        return torch.full_like(first, variants[0])
    if pairing != "random":
        raise ValueError(f"unknown consistency pairing {pairing!r} (anchor | random)")
    if len(variants) < 2:
        raise ValueError("consistency pairing needs at least two train variants")
    pool = torch.tensor(variants, dtype=torch.long)
    pos = (first[:, None] == pool[None]).long().argmax(dim=1)
    # Shift by 1..V-1 positions: uniform over the other variants, never the same one.
    shift = torch.randint(1, len(variants), first.shape, generator=generator)
    return pool[(pos + shift) % len(variants)]


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


def segmentation_ce(logits: Tensor, label: Tensor) -> Tensor:
    """Cross-entropy with logits upsampled (bilinear) to the label size; 255 ignored."""
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, label.long(), ignore_index=IGNORE_INDEX)


def guided_path_loss(
    plain_logits: Tensor, guided_logits: Tensor, label: Tensor, consistency_weight: float = 1.0
) -> tuple[Tensor, dict[str, float]]:
    """DIFF: CE on the plain and the guided logits + weight * MSE between the two logits.

    The guided logits are the teacher-like path, but both get gradients as in DIFF.
    """
    ce_plain = segmentation_ce(plain_logits, label)
    ce_guided = segmentation_ce(guided_logits, label)
    mse = F.mse_loss(plain_logits, guided_logits)
    total = ce_plain + ce_guided + consistency_weight * mse
    parts = {
        "ce_plain": float(ce_plain.detach()),
        "ce_guided": float(ce_guided.detach()),
        "guided_mse": float(mse.detach()),
    }
    return total, parts


def resolve_variants(
    names: list[str], prompt_texts: dict[str, str], store_prompts: list[str], draws: int = 1
) -> list[int]:
    """Indices along the store's V axis of the named variants (every noise draw of each).

    `prompt_texts` is prompts.variant_prompts(PromptConfig): name -> text as stored.
    """
    out = []
    for name in names:
        if name not in prompt_texts:
            raise StoreError(f"unknown prompt variant {name!r} (known: {list(prompt_texts)})")
        text = prompt_texts[name]
        if text not in store_prompts:
            raise StoreError(
                f"prompt variant {name!r} ({text!r}) is not in the feature store "
                f"(stored prompts: {store_prompts}); add it to encode.prompts and re-extract"
            )
        p = store_prompts.index(text)
        out += [p * draws + d for d in range(draws)]
    return out


class VariantViews(Dataset):
    """Reader samples with several variants of the same image stacked: features (K, C, h, w).

    View 0 is a random train variant (prompt randomization); with consistency on, view 1 is
    its pair; with a guided index, the last view is the guided variant. `base` is a
    FeatureDataset (uncropped, unflipped: the trainer crops and flips all views alike).
    Randomness is torch's global generator, which the trainer seeds per iteration.
    """

    def __init__(
        self,
        base: Dataset,
        variants: list[int],
        cfg: PromptLossConfig,
        guided: int | None = None,
    ) -> None:
        if not variants:
            raise StoreError("VariantViews: no train variants")
        self.base, self.variants, self.cfg, self.guided = base, list(variants), cfg, guided

    def __len__(self) -> int:
        return len(self.base)

    def views(self) -> list[int]:
        """The variant indices of one sample's views."""
        first = draw_variants(1, self.variants)
        views = [int(first[0])]
        if self.cfg.consistency_weight > 0:
            views.append(int(pair_variants(first, self.variants, self.cfg.pairing)[0]))
        if self.guided is not None and self.cfg.guided_weight > 0:
            views.append(self.guided)
        return views

    def __getitem__(self, item: int) -> dict[str, Any]:
        samples = []
        for v in self.views():
            self.base.variant = v  # type: ignore[attr-defined]
            samples.append(self.base[item])
        out = dict(samples[0])
        out["features"] = {
            k: torch.stack([s["features"][k] for s in samples]) for k in samples[0]["features"]
        }
        return out


def views_loss(
    model: nn.Module, features: dict[str, Tensor], label: Tensor, cfg: PromptLossConfig
) -> tuple[Tensor, dict[str, float]]:
    """Loss of a batch of VariantViews samples (features (B, K, C, h, w), label (B, H, W)).

    CE on view 0 (+ on view 1 and `consistency_weight` x consistency(view 0, view 1) when
    pairing); with the guided view last, + `guided_weight` x (CE(guided) +
    `guided_consistency_weight` x MSE(view 0 logits, guided logits)) as in DIFF.
    """
    b, k = next(iter(features.values())).shape[:2]
    flat = {key: v.flatten(0, 1) for key, v in features.items()}
    logits = model(flat)
    logits = logits.view(b, k, *logits.shape[1:]).float()
    ce0 = segmentation_ce(logits[:, 0], label)
    total, parts = ce0, {"ce": float(ce0.detach())}
    view = 1
    if cfg.consistency_weight > 0:
        ce1 = segmentation_ce(logits[:, 1], label)
        cons = consistency_loss(logits[:, 0], logits[:, 1], cfg.consistency)
        total = total + ce1 + cfg.consistency_weight * cons
        parts.update(ce_pair=float(ce1.detach()), consistency=float(cons.detach()))
        view = 2
    if cfg.guided_weight > 0 and k > view:
        ce_g = segmentation_ce(logits[:, view], label)
        mse = F.mse_loss(logits[:, 0], logits[:, view])
        total = total + cfg.guided_weight * (ce_g + cfg.guided_consistency_weight * mse)
        parts.update(ce_guided=float(ce_g.detach()), guided_mse=float(mse.detach()))
    return total, parts
