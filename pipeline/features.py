"""One UNet pass that returns the tapped feature maps."""

from __future__ import annotations

import torch

from pipeline.diffusion import DiffusionModel
from pipeline.taps import StopForward, Tap, TapRecorder, as_maps


def unet_features(
    model: DiffusionModel,
    latents_t: torch.Tensor,
    t: int | torch.Tensor,
    prompt_embeds: torch.Tensor,
    taps: list[Tap],
    stop_early: bool = True,
) -> dict[str, torch.Tensor]:
    """Tap name -> (B, C, h, w) features of noisy latents at timestep t (prompt (1|B, 77, D))."""
    unet = model.unet
    batch = latents_t.shape[0]
    timesteps = torch.as_tensor(t, device=latents_t.device).long().reshape(-1).expand(batch)
    context = prompt_embeds.to(latents_t.device, unet.dtype)
    if context.shape[0] == 1:
        context = context.expand(batch, -1, -1)
    # Skipping the layers after the last tap saves most of the pass for shallow taps (dift).
    with TapRecorder(unet, {tap.name: tap.module_path for tap in taps}, stop_early) as rec:
        try:
            unet(latents_t.to(unet.dtype), timesteps, context)
        except StopForward:
            pass
    return as_maps(rec.raw, taps, tuple(latents_t.shape[-2:]), model.vae_stride)
