"""The invert loop: DIFF's DDIM-inversion trajectory of every image and draw of each encoded set,
cached (layout: cache/trajectories.py), so that extract@t is one UNet pass at x_t and a new
timestep costs one pass per image. With another extract.noise_mode (add, clean) it writes
only a note."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
import zarr
from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass
from tqdm import tqdm

from pipeline.cache.encoded import (
    ROWS_PER_SHARD,
    create_rows_array,
    label_of,
    open_labels,
    open_latents,
    read_index,
    read_prompts,
    read_whole,
    set_index,
    set_names,
)
from pipeline.cache.trajectories import (
    GUIDED_NAME,
    NOTE,
    PLAIN_NAME,
    trajectory_fingerprint,
)
from pipeline.core.device import resolve_device
from pipeline.core.errors import StoreError
from pipeline.core.fileio import atomic_path, write_timing
from pipeline.core.names import GUIDED_DIFF_PROMPT
from pipeline.core.params import STRICT, Positive, Timestep
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.inversion import Inversion, invert, invert_guided, region_masks
from pipeline.diffusion.model import DiffusionModel, load_diffusion_model
from pipeline.diffusion.noising import draw_noise
from pipeline.diffusion.unet_features import Contexts, prompt_contexts
from pipeline.extraction.noise import NoiseMode, noise_mode


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
    # The UNet timestep of the last step any store reads (DIFF: 91); null: the whole schedule.
    # Later steps would feed nothing; check_params refuses timesteps beyond it.
    last_timestep: Timestep | None

    @field_validator("schedule")
    @classmethod
    def _descending(cls, schedule: list[int]) -> list[int]:
        if not schedule or schedule != sorted(set(schedule), reverse=True):
            raise ValueError("list distinct timesteps in descending order (DIFF's order)")
        return schedule

    @model_validator(mode="after")
    def _last_on_schedule(self) -> InvertConfig:
        steps = Inversion(tuple(self.schedule), 0, 0, 0, 0, "model").unet_timesteps()
        if self.last_timestep is not None and self.last_timestep not in steps:
            raise ValueError(
                f"last_timestep {self.last_timestep} is not one of the schedule's UNet steps "
                f"{steps}"
            )
        return self

    def inversion(self) -> Inversion:
        return Inversion(
            tuple(self.schedule),
            self.eta,
            self.s_tmin,
            self.s_tmax,
            self.guidance,
            self.prediction,
            self.last_timestep,
        )


def _noise(shas: list[str], shape: tuple, path: str, draw: int, seed: int):
    def noise(i: int, p: int) -> torch.Tensor:
        return draw_noise(shas, shape, f"traj-{path}-{i}-{p}", seed, draw)

    return noise


def invert_set(
    model: DiffusionModel,
    encoded_dir: str,
    name: str,
    out: Path,
    cfg: InvertConfig,
    contexts: Contexts,
    guided: bool,
    attrs: dict,
) -> None:
    """One set's trajectories (plain, and guided when asked) under `out`."""
    inv = cfg.inversion()
    index = set_index(read_index(encoded_dir), name)
    latents = open_latents(encoded_dir, name)
    n, draws = int(latents.shape[0]), int(latents.shape[1])
    shape = (n, draws, len(inv.steps), *latents.shape[2:])
    arrays = {"plain": create_rows_array(out / PLAIN_NAME, shape, "float32", attrs)}
    if guided:
        arrays["guided"] = create_rows_array(out / GUIDED_NAME, shape, "float32", attrs)
        # DIFF's guided view is encoded afresh: its own posterior sample, when there is one.
        guided_latents = open_latents(encoded_dir, name, guided=True)
        labels = open_labels(encoded_dir, name)
    dev, dtype = model.device, model.dtype
    plain = contexts.plain.to(dev, dtype)
    with tqdm(total=n * draws, desc=f"invert {name}", unit="img") as bar:
        for s0 in range(0, n, ROWS_PER_SHARD):
            s1 = min(s0 + ROWS_PER_SHARD, n)
            block = {k: np.empty((s1 - s0, *shape[1:]), np.float32) for k in arrays}
            for d in range(draws):
                for b0 in range(s0, s1, cfg.batch_size):
                    b1 = min(b0 + cfg.batch_size, s1)
                    shas = [str(s) for s in index["sha256"].iloc[b0:b1]]
                    x0 = torch.from_numpy(read_whole(latents, (slice(b0, b1), d))).to(dev, dtype)
                    noise = _noise(shas, tuple(x0.shape[1:]), "plain", d, cfg.seed)
                    xs = invert(model, x0, inv, plain, plain, noise)
                    block["plain"][b0 - s0 : b1 - s0, d] = xs.transpose(0, 1).float().cpu()
                    if guided:
                        rows = list(range(b0, b1))
                        block["guided"][b0 - s0 : b1 - s0, d] = _guided(
                            model,
                            read_whole(guided_latents, (slice(b0, b1), d)),
                            inv,
                            contexts,
                            [label_of(labels, j, d) for j in rows],
                            index.iloc[b0:b1],
                            d,
                            cfg,
                            block["plain"][b0 - s0 : b1 - s0, d],
                        )
                    bar.update(b1 - b0)
            for k, arr in arrays.items():
                arr[s0:s1] = block[k]


def _guided(
    model: DiffusionModel,
    x0: np.ndarray,
    inv: Inversion,
    contexts: Contexts,
    labels: list[np.ndarray],
    rows: pd.DataFrame,
    draw: int,
    cfg: InvertConfig,
    plain: np.ndarray,
) -> np.ndarray:
    """DIFF's guided trajectories (S steps, per image) of a batch's draws, in one UNet call a
    step: labeled train rows with the prompts of the classes in their draw's label (a crop's
    own classes); other rows keep their plain trajectory."""
    out = plain.copy()
    train = [j for j in range(len(rows)) if rows["split"].iloc[j] == "train"]
    if not train:
        return out
    size = tuple(x0.shape[-2:])
    dev, dtype = model.device, model.dtype
    uncond = contexts.plain.to(dev, dtype)
    prompts, noise = [], []
    for j in train:
        label = torch.from_numpy(np.asarray(labels[j])).long()
        present = sorted(set(torch.unique(label).tolist()) & set(contexts.diff))
        masks = region_masks(label, present, size)
        pairs = [(uncond, torch.ones(1, 1, *size))]
        pairs += [(contexts.diff[c].to(dev, dtype), m) for c, m in zip(present, masks, strict=True)]
        prompts.append(pairs)
        sha = str(rows["sha256"].iloc[j])
        noise.append(_noise([sha], tuple(x0.shape[1:]), "guided", draw, cfg.seed))
    x = torch.from_numpy(x0[train]).to(dev, dtype)
    xs = invert_guided(model, x, inv, uncond, prompts, noise)
    out[train] = xs.transpose(0, 1).float().cpu().numpy()
    return out


def run(
    cfg: InvertConfig,
    noise: str,
    model_cfg: ModelConfig,
    encoded_dir: str,
    model_dir: str,
    out: str,
    metrics_path: str,
) -> None:
    """The invert stage: every set's trajectories, or a note where the noise mode `noise`
    (extract.noise_mode) does not invert; its seconds and megabytes to `metrics_path`."""
    start = time.perf_counter()
    _invert_all(cfg, noise_mode(noise), model_cfg, encoded_dir, model_dir, out)
    write_timing(metrics_path, time.perf_counter() - start, out)


def _invert_all(
    cfg: InvertConfig,
    mode: NoiseMode,
    model_cfg: ModelConfig,
    encoded_dir: str,
    model_dir: str,
    out: str,
) -> None:
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if not mode.inverts:
            (tmp / NOTE).write_text(f"extract.noise_mode is {mode.name}: no trajectory needed\n")
            print(f"invert: nothing to do (extract.noise_mode {mode.name})")
            return
        prompts = read_prompts(encoded_dir)
        model = load_diffusion_model(
            model_dir,
            model_cfg.dtype,
            resolve_device(model_cfg.device, "model.device"),
            parts=("unet", "text_encoder"),
            unet=model_cfg.unet,
        )
        if prompts.model_fingerprint != model.fingerprint:
            raise StoreError(
                f"{encoded_dir}: encoded with model {prompts.model_fingerprint}, "
                f"not {model.fingerprint}; rerun encode"
            )
        guided = GUIDED_DIFF_PROMPT in prompts.texts
        contexts = prompt_contexts(model, prompts.texts)
        index = read_index(encoded_dir)
        for name in set_names(index):
            latents: zarr.Array = open_latents(encoded_dir, name)
            has_train = bool((index.loc[index["set"] == name, "split"] == "train").any())
            inversion = {
                k: getattr(cfg, k)
                for k in ("schedule", "eta", "s_tmin", "s_tmax", "guidance", "prediction", "seed")
            }
            if cfg.last_timestep is not None:  # else the fingerprint of the whole schedule's
                inversion["last_timestep"] = cfg.last_timestep
            attrs = {
                "model_fingerprint": model.unet_fingerprint,
                "images": latents.attrs["images"],
                "encoding": latents.attrs["encoding"],
                "inversion": inversion,
                "guided": guided and has_train,
                "unet_timesteps": cfg.inversion().unet_timesteps(),
            }
            attrs["fingerprint"] = trajectory_fingerprint(attrs)
            (tmp / name).mkdir()
            invert_set(
                model, encoded_dir, name, tmp / name, cfg, contexts, guided and has_train, attrs
            )
