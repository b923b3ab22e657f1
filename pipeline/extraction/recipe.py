"""How one timestep's stored values are computed from latents: the recipe (a store identity as
objects), the noise at t, the UNet passes and the storage rounding a reader sees. `extract`
writes them, `tune_prompt` recomputes them online (gradients to the prompt)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.cache.storage import StorageMode, parse_storage
from pipeline.cache.store import FeatureStore
from pipeline.core.errors import StoreError
from pipeline.diffusion.model import DiffusionModel
from pipeline.diffusion.taps import Tap, resolve_taps
from pipeline.diffusion.unet_features import Contexts, variant_features
from pipeline.extraction.noise import NoiseKey, NoiseMode, noise_mode


@dataclasses.dataclass
class FeatureRecipe:
    """How one timestep's stored values are computed (a store identity, as objects)."""

    taps: list[Tap]
    timestep: int
    noise_seed: int
    noise: NoiseMode  # where x_t come from (extraction/noise.py NOISE_MODES)
    conditioning: str  # single | diff
    storage: StorageMode
    # Per tap (components (k, C), mean (C,)) under PCA storage, else None.
    projections: dict[str, tuple[Tensor, Tensor]] | None = None

    @classmethod
    def of_store(cls, model: DiffusionModel, store: FeatureStore) -> FeatureRecipe:
        """The recipe that reproduces `store` with `model` (its taps by recorded module path)."""
        ident = store.identity
        if ident.model_fingerprint != model.unet_fingerprint:
            raise StoreError(
                f"{store.path}: features of model {ident.model_fingerprint}, "
                f"but the loaded model is {model.unet_fingerprint}"
            )
        resolved = resolve_taps(model.unet, list(ident.tap_modules), model.vae_stride)
        taps = [dataclasses.replace(t, name=n) for t, n in zip(resolved, ident.taps, strict=True)]
        return cls(
            taps,
            ident.timestep,
            ident.noise_seed,
            noise_mode(ident.noise_mode),
            ident.conditioning,
            parse_storage(ident.storage),
            store_projections(store),
        )


def store_projections(store: FeatureStore) -> dict[str, tuple[Tensor, ...]] | None:
    """Every tap's projection the store holds (PCA's), as tensors; None where it holds none."""
    held = store.projections()
    if held is None:
        return None
    return {tap: tuple(map(torch.from_numpy, arrays)) for tap, arrays in held.items()}


def noised(
    model: DiffusionModel,
    recipe: FeatureRecipe,
    latents: Tensor,
    shas: Sequence[str],
    draw: int,
    stream: str = "",
) -> Tensor:
    """x_t of clean latents as the recipe's noise mode makes them (`add`: seeded per image
    content, t, seed and draw; the guided view draws from its own `stream`)."""
    key = NoiseKey(recipe.timestep, shas, recipe.noise_seed, draw, stream)
    return recipe.noise.x_t(model, latents, key)


def tap_maps(
    model: DiffusionModel,
    recipe: FeatureRecipe,
    latents_t: Tensor,
    prompt: str,
    context: Tensor | None,
    contexts: Contexts,
    guide: Tensor | None = None,
) -> dict[str, Tensor]:
    """Unreduced tap maps (B, C, h, w) of one variant at x_t (gradients flow to `context`)."""
    return variant_features(
        model,
        latents_t,
        recipe.timestep,
        prompt,
        context,
        recipe.taps,
        guide,
        contexts,
        recipe.conditioning,
    )


def read_values(recipe: FeatureRecipe, maps: dict[str, Tensor]) -> dict[str, Tensor]:
    """The maps as a reader of the store returns them (float32; storage rounding included)."""
    return {
        name: recipe.storage.as_read(
            x, None if recipe.projections is None else recipe.projections[name]
        )
        for name, x in maps.items()
    }
