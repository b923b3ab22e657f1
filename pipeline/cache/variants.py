"""Samples under several prompt variants of one image (the store's V axis): prompt randomization
and consistency pairs (Gong et al.), and DIFF's guided view."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from pipeline.core.errors import StoreError


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


def resolve_variants(names: list[str], variant_names: list[str], draws: int = 1) -> list[int]:
    """Indices along the store's V axis of the named variants (every noise draw of each).

    `variant_names` are the store's prompt variants in order (data/encoded's Prompts.names).
    """
    out = []
    for name in names:
        if name not in variant_names:
            raise StoreError(
                f"prompt variant {name!r} is not in the feature store (stored variants: "
                f"{variant_names}); add it to prompts.variants and re-extract"
            )
        p = variant_names.index(name)
        out += [p * draws + d for d in range(draws)]
    return out


class VariantViews(Dataset):
    """Reader samples with several variants of the same image stacked: features (K, C, h, w).

    View 0 is a random train variant (prompt randomization); with `pairing` (consistency on),
    view 1 is its pair; with a `guided` index, the last view is the guided variant. `base` is
    a FeatureDataset whose `variant` is set per view. Randomness is torch's global generator,
    which the trainer seeds per iteration.
    """

    def __init__(
        self, base: Dataset, variants: list[int], pairing: str | None, guided: int | None
    ) -> None:
        if not variants:
            raise StoreError("VariantViews: no train variants")
        self.base, self.variants = base, list(variants)
        self.pairing, self.guided = pairing, guided

    def __len__(self) -> int:
        return len(self.base)

    def views(self) -> list[int]:
        """The variant indices of one sample's views."""
        first = draw_variants(1, self.variants)
        views = [int(first[0])]
        if self.pairing is not None:
            views.append(int(pair_variants(first, self.variants, self.pairing)[0]))
        if self.guided is not None:
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
