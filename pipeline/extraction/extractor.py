"""The stored values of a batch of one encoded set at one timestep: x_t (noised, or read from the
cached inversion), every variant's UNet passes, reduced to the storage mode on the device."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch
import zarr

from pipeline.cache.encoded import Prompts, read_whole
from pipeline.cache.storage import Projection, sample_pixels
from pipeline.core.names import GUIDED_DIFF_PROMPT, GUIDED_PROMPT
from pipeline.diffusion.model import DiffusionModel
from pipeline.diffusion.unet_features import Contexts, prompt_contexts
from pipeline.extraction.recipe import FeatureRecipe, noised, tap_maps

GUIDED_TEXTS = (GUIDED_PROMPT, GUIDED_DIFF_PROMPT)


@dataclasses.dataclass
class SetInputs:
    """One encoded set's cached inputs: index rows, latents (N, K, C, h, w), and what the guided
    variants need: their own posterior samples, the labels (the guide), DIFF's trajectories."""

    index: pd.DataFrame
    latents: zarr.Array
    guided_latents: zarr.Array | None = None  # the guided view's own samples (else `latents`)
    labels: zarr.Array | None = None  # (N, H, W) frames or (N, K, H, W) crop draws
    trajectories: dict[str, zarr.Array] | None = None  # "plain" / "guided" (N, K, S, C, h, w)
    step: int | None = None  # the trajectory step whose UNet pass runs at the timestep


class Extractor:
    """Computes the stored (reduced) features of a batch of images for one timestep."""

    def __init__(self, model: DiffusionModel, recipe: FeatureRecipe, prompts: Prompts) -> None:
        self.model, self.recipe = model, recipe
        self.texts = list(prompts.texts)
        self.embeds = prompts.embeddings  # (P, 77, D)
        self.contexts: Contexts = prompt_contexts(model, self.texts).to(model.device, model.dtype)
        self.guided = any(t in GUIDED_TEXTS for t in self.texts)

    def raw_features(
        self, latents_t: dict[str, torch.Tensor], variant: int, guide: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Unreduced tap maps (B, C, h, w) of one variant (prompt x draw) on the device.

        `latents_t` maps "plain" (and "guided": the guided view's own x_t) to (B, K, ...);
        `guide` are the labels (B, H, W), or (B, K, H, W) one per crop draw.
        """
        p, d = divmod(variant, latents_t["plain"].shape[1])
        prompt = self.texts[p]
        path = "guided" if prompt in GUIDED_TEXTS and "guided" in latents_t else "plain"
        x_t = latents_t[path][:, d].to(self.model.device, self.model.dtype)
        context = None
        if not prompt.startswith("<"):
            context = self.embeds[p : p + 1].to(self.model.device, self.model.dtype)
        if guide is not None and guide.ndim == 4:
            guide = guide[:, d]
        return tap_maps(self.model, self.recipe, x_t, prompt, context, self.contexts, guide)

    def latents_t(self, inputs: SetInputs, rows: slice, shas: list[str]) -> dict[str, torch.Tensor]:
        """x_t (B, K, C, h, w) of some rows, noised at t or read from the trajectories; the guided
        view's from its own posterior sample and noise (DIFF encodes and noises each view)."""
        if inputs.trajectories is not None:
            return {
                k: torch.from_numpy(read_whole(arr, (rows, slice(None), inputs.step)))
                for k, arr in inputs.trajectories.items()
            }
        out = {"plain": self._noised(inputs.latents, rows, shas, "")}
        if self.guided:
            source = inputs.guided_latents if inputs.guided_latents is not None else inputs.latents
            out["guided"] = self._noised(source, rows, shas, "guided")
        return out

    def _noised(self, latents: zarr.Array, rows: slice, shas: list[str], stream: str):
        clean = torch.from_numpy(read_whole(latents, rows))
        dev, dtype = self.model.device, self.model.dtype
        noisy = [
            noised(self.model, self.recipe, clean[:, d].to(dev, dtype), shas, d, stream)
            for d in range(clean.shape[1])
        ]
        return torch.stack(noisy, 1)

    @torch.inference_mode()
    def batch(
        self, latents_t: dict[str, torch.Tensor], guide: torch.Tensor | None = None
    ) -> dict[str, dict[str, np.ndarray]]:
        """What the store holds for a batch, on the host: per array of its mode ("values" and
        int8's "scales") per tap, (B, V, ...)."""
        names = [t.name for t in self.recipe.taps]
        stored: dict[str, dict[str, list[torch.Tensor]]] = {}
        projections = self.recipe.projections
        for v in range(len(self.texts) * latents_t["plain"].shape[1]):
            feats = self.raw_features(latents_t, v, guide)
            for name in names:
                proj = None if projections is None else projections[name]
                # Reduce on the device: only the stored bytes cross to the host.
                for part, x in self.recipe.storage.reduce(feats[name], proj).items():
                    stored.setdefault(part, {}).setdefault(name, []).append(x)
        return {
            part: {k: torch.stack(v, 1).cpu().numpy() for k, v in taps.items()}
            for part, taps in stored.items()
        }

    @torch.inference_mode()
    def fit_projections(
        self, inputs: SetInputs, n: int, fit_pixels: int, batch_size: int
    ) -> dict[str, Projection] | None:
        """What the storage mode fits on a pixel sample of the first `n` images (variant 0),
        per tap (PCA: its components), set on the recipe; None, and no sample drawn, where the
        mode fits nothing."""

        def sample() -> dict[str, np.ndarray]:
            gen = torch.Generator().manual_seed(self.recipe.noise_seed)
            chunks: dict[str, list[np.ndarray]] = {t.name: [] for t in self.recipe.taps}
            per_batch = max(1, fit_pixels * batch_size // max(n, 1))
            shas = [str(s) for s in inputs.index["sha256"]]
            for b0 in range(0, n, batch_size):
                b1 = min(b0 + batch_size, n)
                x_t = self.latents_t(inputs, slice(b0, b1), shas[b0:b1])
                feats = self.raw_features(x_t, 0, None)
                for tap in self.recipe.taps:
                    chunks[tap.name].append(sample_pixels(feats[tap.name], per_batch, gen))
            return {name: np.concatenate(c) for name, c in chunks.items()}

        fitted = self.recipe.storage.fit(sample)
        if fitted is not None:
            self.recipe.projections = fitted
        return fitted
