"""UNet passes that return tapped feature maps, for a text prompt or a placeholder conditioning."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.core.classes import IGNORE_INDEX, NUM_CLASSES
from pipeline.core.names import CATEGORY_PROMPT, GUIDED_PROMPT
from pipeline.diffusion.guided import guided_cross_attention
from pipeline.diffusion.model import DiffusionModel
from pipeline.diffusion.prompts import category_prompts, class_prompts
from pipeline.diffusion.taps import StopForward, Tap, TapRecorder, as_maps
from pipeline.diffusion.text import encode_text, eos_states


def unet_features(
    model: DiffusionModel,
    latents_t: Tensor,
    t: int | Tensor,
    context: Tensor,
    taps: list[Tap],
    stop_early: bool = True,
) -> dict[str, Tensor]:
    """Tap name -> (B, C, h, w) features of noisy latents at timestep t (context (1|B, L, D))."""
    unet = model.unet
    batch = latents_t.shape[0]
    timesteps = torch.as_tensor(t, device=latents_t.device).long().reshape(-1).expand(batch)
    context = context.to(latents_t.device, unet.dtype)
    if context.shape[0] == 1:
        context = context.expand(batch, -1, -1)
    # Skipping the layers after the last tap saves most of the pass for shallow taps (dift).
    with TapRecorder(unet, {tap.name: tap.module_path for tap in taps}, stop_early) as rec:
        try:
            unet(latents_t.to(unet.dtype), timesteps, context)
        except StopForward:
            pass
    return as_maps(rec.raw, taps, tuple(latents_t.shape[-2:]), model.vae_stride)


@torch.no_grad()
def placeholder_contexts(model: DiffusionModel, prompts: Sequence[str]) -> dict[str, Tensor]:
    """Contexts of the placeholders among `prompts`, keyed by placeholder text.

    "<guided>" -> the 19 class prompts (19, L, D), plus "" (the plain prompt, for unlabeled
    pixels); "<category>" -> the class names' end-of-text states (1, 19, D), as VPD.
    """
    out: dict[str, Tensor] = {}
    if GUIDED_PROMPT in prompts:
        out[GUIDED_PROMPT] = encode_text(model, class_prompts())
        out[""] = encode_text(model, [""])
    if CATEGORY_PROMPT in prompts:
        out[CATEGORY_PROMPT] = eos_states(model, category_prompts())[None]
    return out


def variant_features(
    model: DiffusionModel,
    latents_t: Tensor,
    t: int,
    prompt: str,
    prompt_embeds: Tensor,
    taps: list[Tap],
    labels: Tensor | None,
    contexts: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Features of one stored variant: a text prompt (`prompt_embeds`), "<category>" or "<guided>".

    For "<guided>", `labels` (B, H, W) train ids are the guide; pixels labeled 255 (and whole
    batches without labels: None) get exactly the plain-prompt features.
    """
    if prompt == GUIDED_PROMPT:
        plain = contexts[""]
        if labels is None:
            return unet_features(model, latents_t, t, plain, taps)
        class_embeds = contexts[GUIDED_PROMPT]
        if class_embeds.shape[0] != NUM_CLASSES:
            raise ValueError(
                f"guided context must hold {NUM_CLASSES} prompts: {class_embeds.shape}"
            )
        with guided_cross_attention(model.unet, labels, class_embeds):
            return unet_features(model, latents_t, t, plain, taps)
    if prompt == CATEGORY_PROMPT:
        return unet_features(model, latents_t, t, contexts[CATEGORY_PROMPT], taps)
    return unet_features(model, latents_t, t, prompt_embeds, taps)


def guide_labels(labels: np.ndarray, splits: Sequence[str], split: str = "train") -> np.ndarray:
    """Labels (B, H, W) for the guided variant: rows of `split` kept, all other rows 255.

    Only the source domain has a train split, so target (and val) images get exactly the
    plain-prompt features in the guided slot: never a label leak into evaluation.
    """
    keep = np.array([s == split for s in splits], dtype=bool)
    out = np.array(labels, copy=True)
    out[~keep] = IGNORE_INDEX
    return out
