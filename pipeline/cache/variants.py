"""Which stored variants a training sample stacks as its views: prompt randomization and
consistency pairs (Gong et al.) and DIFF's guided view, all of the sample's one draw.

A store's variant v is prompt v // K, draw v % K. DIFF's plain and guided views share the
augmented image (encoder_decoder.py:281-282), so every view of a sample reads the same draw.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.core.errors import StoreError


def prompt_indices(names: list[str], variant_names: list[str]) -> list[int]:
    """Positions in the store's prompt axis of the named variants (prompts.variants names)."""
    out = []
    for name in names:
        if name not in variant_names:
            raise StoreError(
                f"prompt variant {name!r} is not in the feature store (stored variants: "
                f"{variant_names}); add it to prompts.variants and re-extract"
            )
        out.append(variant_names.index(name))
    return out


@dataclasses.dataclass(frozen=True)
class Views:
    """The views of each sample: a random train prompt, with `pairing` a second one (random: a
    different one; anchor: the first train prompt), with `guided` the guided prompt last."""

    prompts: tuple[int, ...]  # train prompts (positions in the store's prompt axis)
    draws: int  # K draws per image in the store
    pairing: str | None = None  # random | anchor | None (no consistency pair)
    guided: int | None = None  # the guided prompt's position, or None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise StoreError("no train prompt variants")
        if self.pairing == "random" and len(self.prompts) < 2:
            raise StoreError("consistency pairing `random` needs at least two train variants")
        if self.pairing not in (None, "random", "anchor"):
            raise StoreError(f"unknown consistency pairing {self.pairing!r} (anchor | random)")

    @property
    def count(self) -> int:
        """Views per sample."""
        return 1 + (self.pairing is not None) + (self.guided is not None)

    def variants_of(self, draw: int) -> list[int]:
        """Every store variant the views of `draw` can read (what a preload must hold)."""
        prompts = [*self.prompts, *([] if self.guided is None else [self.guided])]
        return [p * self.draws + draw for p in dict.fromkeys(prompts)]

    def pick(self, rng: np.random.Generator, draw: int) -> tuple[int, ...]:
        """The store variants of one sample's views of `draw`."""
        first = int(rng.integers(len(self.prompts)))
        prompts = [self.prompts[first]]
        if self.pairing == "anchor":
            prompts.append(self.prompts[0])
        elif self.pairing == "random":
            # Shift by 1..P-1 positions: uniform over the other prompts, never the same one.
            shift = int(rng.integers(1, len(self.prompts)))
            prompts.append(self.prompts[(first + shift) % len(self.prompts)])
        if self.guided is not None:
            prompts.append(self.guided)
        return tuple(p * self.draws + draw for p in prompts)
