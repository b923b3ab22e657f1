"""Noise modes (`extract.noise_mode`): where a store's x_t come from. Every mode is one class
below and one entry of NOISE_MODES; extract, tune_prompt, invert, the plan and check_params ask
the mode, never its name."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.cache.trajectories import check_on_schedule
from pipeline.core.errors import ConfigError
from pipeline.diffusion.model import DiffusionModel
from pipeline.diffusion.noising import add_noise


@dataclasses.dataclass(frozen=True)
class NoiseKey:
    """What one x_t is drawn for: the timestep, each image's content hash, the seed, the crop
    draw, and the stream (the guided view's own noise: DIFF's two paths are independent)."""

    timestep: int
    shas: Sequence[str]
    seed: int
    draw: int = 0
    stream: str = ""


class NoiseMode:
    """One noise mode: how clean latents become x_t at a timestep, and whether x_t are DIFF's
    inversion trajectory instead (computed by the invert stage, read by extract at its step)."""

    name: str = ""
    inverts: bool = False  # x_t are read from data/trajectories (invert computes them)

    def x_t(self, model: DiffusionModel, latents: Tensor, key: NoiseKey) -> Tensor:
        """x_t of clean latents (B, C, h, w), where they lie."""
        raise NotImplementedError

    def check_timesteps(self, timesteps: Sequence[int], inversion: Sequence[int]) -> None:
        """Refuse timesteps this mode cannot read (`inversion`: the invert schedule's)."""

    def __repr__(self) -> str:
        return f"NoiseMode({self.name!r})"


class Add(NoiseMode):
    """One seeded q-sample at t, drawn per (image content, t, seed, draw)."""

    name = "add"

    def x_t(self, model: DiffusionModel, latents: Tensor, key: NoiseKey) -> Tensor:
        with torch.no_grad():
            return add_noise(
                model, latents, key.timestep, list(key.shas), key.seed, key.draw, key.stream
            )


class Trajectory(NoiseMode):
    """DIFF's DDIM inversion (diffusion.py:102-291 of its code): x_t is the trajectory's input
    of the step whose UNet pass runs at t, cached by the invert stage."""

    name, inverts = "trajectory", True

    def x_t(self, model: DiffusionModel, latents: Tensor, key: NoiseKey) -> Tensor:
        # A caller's slip, not a param: extract reads these x_t from invert's output.
        raise NotImplementedError("noise_mode trajectory: x_t are read from data/trajectories")

    def check_timesteps(self, timesteps: Sequence[int], inversion: Sequence[int]) -> None:
        check_on_schedule(list(timesteps), list(inversion))


class Clean(NoiseMode):
    """No noise: the UNet reads the clean latent at timestep t (CleanDIFT's get_features,
    sd_feature_extraction.py:466-478)."""

    name = "clean"

    def x_t(self, model: DiffusionModel, latents: Tensor, key: NoiseKey) -> Tensor:
        return latents


# Every noise mode (`extract.noise_mode`): the one place a mode is declared.
NOISE_MODES: dict[str, NoiseMode] = {m.name: m for m in (Add(), Trajectory(), Clean())}


def noise_mode(name: str) -> NoiseMode:
    """The mode `name` names (NOISE_MODES), or one ConfigError listing them."""
    if name not in NOISE_MODES:
        raise ConfigError(f"unknown noise mode {name!r}: expected one of {list(NOISE_MODES)}")
    return NOISE_MODES[name]
