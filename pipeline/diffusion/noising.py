"""Deterministic noise per image content, the one-step forward diffusion, prediction types."""

from __future__ import annotations

import hashlib

import torch

from pipeline.core.errors import ModelError
from pipeline.diffusion.model import DiffusionModel


def noise_generator_seed(sha256: str, t: int | str, seed: int, draw: int = 0) -> int:
    """A 63-bit generator seed from (image content hash, timestep or purpose, seed, draw)."""
    key = f"{sha256}:{t}:{int(seed)}:{int(draw)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def draw_noise(
    shas: list[str], shape: tuple[int, ...], t: int | str, seed: int, draw: int = 0
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
    model: DiffusionModel,
    latents: torch.Tensor,
    t: int,
    shas: list[str],
    seed: int,
    draw: int = 0,
    stream: str = "",
) -> torch.Tensor:
    """One-step forward diffusion to timestep t: √ᾱ·x0 + √(1−ᾱ)·ε with seeded per-image ε
    (`stream` names another independent noise of the same image, e.g. "guided")."""
    key = t if not stream else f"{stream}-{t}"
    noise = draw_noise(shas, tuple(latents.shape[1:]), key, seed, draw)
    noise = noise.to(latents.device, latents.dtype)
    return model.scheduler.add_noise(latents, noise, timesteps_like(t, latents))
