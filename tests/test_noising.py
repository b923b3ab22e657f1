"""Deterministic noise per image content; UNet features independent of batch composition."""

from __future__ import annotations

import hashlib

import pytest
import torch
from helpers import tiny_model

from pipeline.diffusion.noising import add_noise, draw_noise, noise_generator_seed
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.unet_features import unet_features

SHAS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3)]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_seed_depends_on_every_part() -> None:
    base = noise_generator_seed(SHAS[0], 50, 0, 0)
    assert base == noise_generator_seed(SHAS[0], 50, 0, 0)
    others = {
        noise_generator_seed(SHAS[1], 50, 0, 0),
        noise_generator_seed(SHAS[0], 150, 0, 0),
        noise_generator_seed(SHAS[0], 50, 1, 0),
        noise_generator_seed(SHAS[0], 50, 0, 1),
    }
    assert base not in others and len(others) == 4
    assert 0 <= base < 2**63


def test_noise_same_in_any_batch_or_order() -> None:
    batch = draw_noise(SHAS, (4, 8, 8), t=50, seed=0)
    assert batch.shape == (3, 4, 8, 8)
    reordered = draw_noise(SHAS[::-1], (4, 8, 8), t=50, seed=0)
    torch.testing.assert_close(reordered, batch.flip(0), rtol=0, atol=0)
    single = draw_noise(SHAS[1:2], (4, 8, 8), t=50, seed=0)
    torch.testing.assert_close(single[0], batch[1], rtol=0, atol=0)
    assert not torch.equal(draw_noise(SHAS, (4, 8, 8), t=50, seed=0, draw=1), batch)


def test_add_noise_per_image(model) -> None:
    latents = torch.randn(3, 4, 8, 8)
    noisy = add_noise(model, latents, 50, SHAS, seed=0)
    one = add_noise(model, latents[2:3], 50, SHAS[2:3], seed=0)
    torch.testing.assert_close(one[0], noisy[2], rtol=0, atol=0)
    a = model.scheduler.alphas_cumprod[50]
    expected = a.sqrt() * latents + (1 - a).sqrt() * draw_noise(SHAS, (4, 8, 8), 50, 0)
    torch.testing.assert_close(noisy, expected)


def test_features_batch_size_invariant(model) -> None:
    taps = resolve_taps(model.unet, "diff", vae_stride=model.vae_stride)
    latents = torch.randn(3, 4, 8, 16)
    context = torch.randn(1, 77, 16)
    with torch.no_grad():
        noisy = add_noise(model, latents, 150, SHAS, seed=0)
        batch = unet_features(model, noisy, 150, context, taps)
        for i in range(3):
            one = add_noise(model, latents[i : i + 1], 150, SHAS[i : i + 1], seed=0)
            single = unet_features(model, one, 150, context, taps)
            for name, value in single.items():
                torch.testing.assert_close(value[0], batch[name][i], atol=1e-5, rtol=1e-4)
