"""Deterministic noising of latents: seeded per image content, one-step or DDIM inversion."""

from __future__ import annotations

import hashlib

import torch

from pipeline.core.errors import ModelError
from pipeline.diffusion.model import DiffusionModel


def noise_generator_seed(sha256: str, t: int, seed: int, draw: int = 0) -> int:
    """A 63-bit generator seed from (image content hash, timestep, noise seed, draw index)."""
    key = f"{sha256}:{int(t)}:{int(seed)}:{int(draw)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def draw_noise(
    shas: list[str], shape: tuple[int, ...], t: int, seed: int, draw: int = 0
) -> torch.Tensor:
    """Gaussian noise (B, *shape), row i from its own CPU generator: the same in any batch or order."""
    rows = []
    for sha in shas:
        gen = torch.Generator("cpu").manual_seed(noise_generator_seed(sha, t, seed, draw))
        rows.append(torch.randn(shape, generator=gen))
    return torch.stack(rows)


def denoising_target(
    model: DiffusionModel, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should output for noisy latents: ε, or v = α·ε − σ·x0 for v-prediction."""
    kind = model.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return model.scheduler.get_velocity(latents, noise, timesteps)
    raise ModelError(f"{model.source}: unsupported prediction_type {kind!r}")


def predict_x0_eps(
    model: DiffusionModel, sample: torch.Tensor, output: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a UNet output at `timesteps` into (x0, ε) according to the prediction type."""
    alphas = model.scheduler.alphas_cumprod.to(sample.device, torch.float32)[timesteps.cpu()]
    a = alphas.sqrt().view(-1, 1, 1, 1).to(sample.dtype)
    s = (1 - alphas).sqrt().view(-1, 1, 1, 1).to(sample.dtype)
    kind = model.prediction_type
    if kind == "epsilon":
        eps = output
        x0 = (sample - s * eps) / a
    elif kind == "v_prediction":
        x0 = a * sample - s * output
        eps = a * output + s * sample
    else:
        raise ModelError(f"{model.source}: unsupported prediction_type {kind!r}")
    return x0, eps


def timesteps_like(t: int, latents: torch.Tensor) -> torch.Tensor:
    """A (B,) long tensor of timestep `t` on the latents' device."""
    return torch.full((latents.shape[0],), int(t), dtype=torch.long, device=latents.device)


def add_noise(
    model: DiffusionModel, latents: torch.Tensor, t: int, shas: list[str], seed: int, draw: int = 0
) -> torch.Tensor:
    """One-step forward diffusion to timestep t: √ᾱ·x0 + √(1−ᾱ)·ε with seeded per-image ε."""
    noise = draw_noise(shas, tuple(latents.shape[1:]), t, seed, draw)
    noise = noise.to(latents.device, latents.dtype)
    return model.scheduler.add_noise(latents, noise, timesteps_like(t, latents))


@torch.no_grad()
def ddim_invert(
    model: DiffusionModel, latents: torch.Tensor, t: int, prompt_embeds: torch.Tensor, steps: int
) -> torch.Tensor:
    """Deterministic DDIM inversion of clean latents up to timestep t in `steps` UNet passes.

    As in DIFF's first release: no random noise; ε comes from the UNet itself. Each step reads the
    UNet at the current (sample, timestep), turns its output into (x0, ε) per the prediction type,
    and re-noises to the next timestep.
    """
    if steps < 1 or t < 1:
        raise ValueError(f"DDIM inversion needs steps >= 1 and t >= 1 (got steps={steps}, t={t})")
    grid = torch.linspace(0, t, steps + 1).round().long().tolist()
    alphas = model.scheduler.alphas_cumprod.to(torch.float32)
    context = _batched(prompt_embeds, latents.shape[0]).to(latents.device, model.unet.dtype)
    x = latents
    for cur, nxt in zip(grid[:-1], grid[1:], strict=True):
        cur_t = timesteps_like(cur, x)
        out = model.unet(x.to(model.unet.dtype), cur_t, context).sample.to(x.dtype)
        x0, eps = predict_x0_eps(model, x, out, cur_t)
        a = alphas[nxt].to(x.device, x.dtype)
        x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return x


def noise_latents(
    model: DiffusionModel,
    latents: torch.Tensor,
    t: int,
    shas: list[str],
    seed: int,
    draw: int = 0,
    mode: str = "add",
    prompt_embeds: torch.Tensor | None = None,
    inversion_steps: int = 5,
) -> torch.Tensor:
    """Latents at timestep t: `add` (seeded one-step noise) or `ddim_inversion` (deterministic)."""
    if mode == "add":
        return add_noise(model, latents, t, shas, seed, draw)
    if mode == "ddim_inversion":
        if prompt_embeds is None:
            raise ValueError("ddim_inversion needs prompt_embeds")
        return ddim_invert(model, latents, t, prompt_embeds, inversion_steps)
    raise ValueError(f"unknown noise mode {mode!r}; expected 'add' or 'ddim_inversion'")


def _batched(embeds: torch.Tensor, batch: int) -> torch.Tensor:
    return embeds.expand(batch, -1, -1) if embeds.shape[0] == 1 else embeds
