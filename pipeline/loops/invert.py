"""The invert loop: DIFF's DDIM-inversion trajectory of every image and draw, cached, so that
extract@t is one UNet pass at x_t and a new timestep costs one pass per image.

```
data/trajectories/<domain>/plain.zarr   (N_d, K, S, C, h, w): x_i, the UNet input of step i
data/trajectories/<domain>/guided.zarr  the same for DIFF's guided path (the source domain,
                                        with DIFF's guided variant; other rows: plain)
```
With extract.noise_mode `add` the stage writes only a note: nothing to invert.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import zarr
from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass
from tqdm import tqdm

from pipeline.cache.encoded import (
    ROWS_PER_SHARD,
    create_rows_array,
    domain_index,
    open_labels,
    open_latents,
    read_index,
    read_prompts,
    source_domain,
)
from pipeline.core.device import resolve_device
from pipeline.core.errors import ConfigError, StoreError
from pipeline.core.fileio import atomic_path
from pipeline.core.names import GUIDED_DIFF_PROMPT
from pipeline.core.params import STRICT, Positive, Timestep
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.features import Contexts, prompt_contexts
from pipeline.diffusion.inversion import Inversion, invert, invert_guided, region_masks
from pipeline.diffusion.model import DiffusionModel, load_diffusion_model
from pipeline.diffusion.noising import draw_noise

PLAIN_NAME, GUIDED_NAME = "plain.zarr", "guided.zarr"
NoiseMode = Literal["add", "trajectory"]  # extract.noise_mode
NOTE = "README.txt"


@dataclass(config=STRICT)
class InvertConfig:
    """The `invert` group: DIFF's inversion (diff_config.yaml), used by noise_mode trajectory."""

    schedule: list[Timestep]  # DIFF's scheduler_timesteps, descending
    eta: Annotated[float, Field(ge=0)]
    s_tmin: int  # noise is injected only for s_tmin < t < s_tmax
    s_tmax: int
    guidance: Annotated[float, Field(ge=0)]  # classifier-free guidance scale
    prediction: Literal["model", "epsilon"]  # epsilon: DIFF's code reads SD-2.1's v as epsilon
    batch_size: Positive
    seed: int

    @field_validator("schedule")
    @classmethod
    def _descending(cls, schedule: list[int]) -> list[int]:
        if not schedule or schedule != sorted(set(schedule), reverse=True):
            raise ValueError("list distinct timesteps in descending order (DIFF's order)")
        return schedule

    def inversion(self) -> Inversion:
        return Inversion(
            tuple(self.schedule), self.eta, self.s_tmin, self.s_tmax, self.guidance, self.prediction
        )


def trajectory_fingerprint(attrs: dict) -> str:
    """What a trajectory's values depend on, hashed (a feature store records it)."""
    return hashlib.sha256(json.dumps(attrs, sort_keys=True).encode()).hexdigest()[:16]


def open_trajectory(traj_dir: str | os.PathLike[str], domain: str, guided: bool) -> zarr.Array:
    path = Path(traj_dir) / domain / (GUIDED_NAME if guided else PLAIN_NAME)
    if not path.exists():
        raise StoreError(f"{path}: no trajectory (run invert with extract.noise_mode trajectory)")
    return zarr.open_array(path, mode="r")


def trajectory_step(trajectory: zarr.Array, timestep: int) -> int:
    """The step of a trajectory whose UNet pass runs at `timestep`; a ConfigError if none."""
    ts = [int(t) for t in trajectory.attrs["unet_timesteps"]]
    if timestep not in ts:
        raise ConfigError(
            f"timestep {timestep} is not on the inversion schedule: its UNet passes run at {ts} "
            "(DIFF's save_timestep i reads step i); list those in `timesteps`"
        )
    return ts.index(timestep)


def _noise(shas: list[str], shape: tuple, path: str, draw: int, seed: int):
    def noise(i: int, p: int) -> torch.Tensor:
        return draw_noise(shas, shape, f"traj-{path}-{i}-{p}", seed, draw)

    return noise


def invert_domain(
    model: DiffusionModel,
    encoded_dir: str,
    domain: str,
    out: Path,
    cfg: InvertConfig,
    contexts: Contexts,
    guided: bool,
    attrs: dict,
) -> None:
    """One domain's trajectories (plain, and guided when asked) under `out`."""
    inv = cfg.inversion()
    index = domain_index(read_index(encoded_dir), domain)
    latents = open_latents(encoded_dir, domain)
    labels = open_labels(encoded_dir, domain) if guided else None
    n, draws = int(latents.shape[0]), int(latents.shape[1])
    shape = (n, draws, len(inv.steps), *latents.shape[2:])
    arrays = {"plain": create_rows_array(out / PLAIN_NAME, shape, "float32", attrs)}
    if guided:
        arrays["guided"] = create_rows_array(out / GUIDED_NAME, shape, "float32", attrs)
    dev, dtype = model.device, model.dtype
    plain = contexts.plain.to(dev, dtype)
    with tqdm(total=n * draws, desc=f"invert {domain}", unit="img") as bar:
        for s0 in range(0, n, ROWS_PER_SHARD):
            s1 = min(s0 + ROWS_PER_SHARD, n)
            block = {k: np.empty((s1 - s0, *shape[1:]), np.float32) for k in arrays}
            for d in range(draws):
                for b0 in range(s0, s1, cfg.batch_size):
                    b1 = min(b0 + cfg.batch_size, s1)
                    shas = [str(s) for s in index["sha256"].iloc[b0:b1]]
                    x0 = torch.from_numpy(np.asarray(latents[b0:b1, d])).to(dev, dtype)
                    noise = _noise(shas, tuple(x0.shape[1:]), "plain", d, cfg.seed)
                    xs = invert(model, x0, inv, plain, plain, noise)
                    block["plain"][b0 - s0 : b1 - s0, d] = xs.transpose(0, 1).float().cpu()
                    if guided:
                        for j in range(b0, b1):
                            block["guided"][j - s0, d] = _guided(
                                model,
                                x0[j - b0 : j - b0 + 1],
                                inv,
                                contexts,
                                labels[j],
                                index.iloc[j],
                                d,
                                cfg,
                                block["plain"][j - s0, d],
                            )
                    bar.update(b1 - b0)
            for k, arr in arrays.items():
                arr[s0:s1] = block[k]


def _guided(model, x0, inv, contexts, label, row, draw, cfg, plain) -> np.ndarray:
    """DIFF's guided trajectory of one image (labeled train rows only; others: the plain one)."""
    if row["split"] != "train":
        return plain
    label_t = torch.from_numpy(np.asarray(label)).long()
    present = sorted(set(torch.unique(label_t).tolist()) & set(contexts.diff))
    size = tuple(x0.shape[-2:])
    dev, dtype = model.device, model.dtype
    prompts = [(contexts.plain.to(dev, dtype), torch.ones(1, 1, *size))]
    masks = region_masks(label_t, present, size)
    prompts += [(contexts.diff[c].to(dev, dtype), m) for c, m in zip(present, masks, strict=True)]
    noise = _noise([str(row["sha256"])], tuple(x0.shape[1:]), "guided", draw, cfg.seed)
    xs = invert_guided(model, x0, inv, contexts.plain.to(dev, dtype), prompts, noise)
    return xs[:, 0].float().cpu().numpy()


def run(
    cfg: InvertConfig,
    noise_mode: str,
    model_cfg: ModelConfig,
    encoded_dir: str,
    model_dir: str,
    out: str,
) -> None:
    """The invert stage: every domain's trajectories, or a note when noise_mode is `add`."""
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if noise_mode != "trajectory":
            (tmp / NOTE).write_text(f"extract.noise_mode is {noise_mode}: no trajectory needed\n")
            print(f"invert: nothing to do (extract.noise_mode {noise_mode})")
            return
        prompts = read_prompts(encoded_dir)
        model = load_diffusion_model(
            model_dir,
            model_cfg.dtype,
            resolve_device(model_cfg.device),
            parts=("unet", "text_encoder"),
        )
        if prompts.model_fingerprint != model.fingerprint:
            raise StoreError(
                f"{encoded_dir}: encoded with model {prompts.model_fingerprint}, "
                f"not {model.fingerprint}; rerun encode"
            )
        guided = GUIDED_DIFF_PROMPT in prompts.texts
        contexts = prompt_contexts(model, prompts.texts)
        index = read_index(encoded_dir)
        source = source_domain(index)
        for domain in sorted(set(index["domain"])):
            latents = open_latents(encoded_dir, domain)
            attrs = {
                "model_fingerprint": model.fingerprint,
                "images": latents.attrs["images"],
                "encoding": latents.attrs["encoding"],
                "inversion": {
                    **{
                        k: getattr(cfg, k)
                        for k in (
                            "schedule",
                            "eta",
                            "s_tmin",
                            "s_tmax",
                            "guidance",
                            "prediction",
                            "seed",
                        )
                    }
                },
                "guided": guided and domain == source,
                "unet_timesteps": cfg.inversion().unet_timesteps(),
            }
            attrs["fingerprint"] = trajectory_fingerprint(attrs)
            (tmp / domain).mkdir()
            invert_domain(
                model,
                encoded_dir,
                domain,
                tmp / domain,
                cfg,
                contexts,
                guided and domain == source,
                attrs,
            )
