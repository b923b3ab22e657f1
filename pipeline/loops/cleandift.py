"""The cleandift loop: fine-tune a copy of the UNet so that one pass on the clean latent gives
the frozen UNet's noisy-timestep features (CleanDIFT, CompVis/cleandift train.py and
src/sd_feature_extraction.py:353-429); the result is a diffusers UNet folder for model.unet.
With cleandift.steps 0 the stage writes only a note."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import Field
from pydantic.dataclasses import dataclass
from tqdm import tqdm
from transformers import get_constant_schedule_with_warmup

from pipeline.cache.encoded import (
    open_latents,
    read_index,
    read_prompts,
    read_whole,
    source_domain,
    split_rows,
)
from pipeline.core.device import resolve_device, set_threads
from pipeline.core.errors import ConfigError, StoreError
from pipeline.core.fileio import atomic_path, write_json
from pipeline.core.params import STRICT, Timestep
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.cleandift import ProjectionHeads, alignment_loss, stratified_timesteps
from pipeline.diffusion.model import (
    DiffusionModel,
    load_diffusion_model,
    record_fingerprint,
)
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.text import encode_text
from pipeline.diffusion.unet_features import unet_features

NOTE = "NOTE.txt"
# Where this stage writes the fine-tuned UNet (dvc.yaml: outs data/cleandift)
CLEANDIFT_UNET = "data/cleandift/unet"
# The teacher's timesteps: stratified over [t_min, t_max) (sd_feature_extraction.py:241-242,
# the config's t_max 999)
T_MIN, T_MAX = 1, 999


@dataclass(config=STRICT)
class CleanDiftConfig:
    """The `cleandift` group (CleanDIFT's configs/sd21_feature_extractor.yaml in brackets)."""

    steps: Annotated[int, Field(ge=0)]  # optimizer steps; 0: off [max_steps null: open-ended]
    batch_size: Annotated[int, Field(ge=1)]  # images per step [8]
    lr: Annotated[float, Field(gt=0)]  # Adam, constant after the warm-up [1e-5]
    warmup: Annotated[int, Field(ge=0)]  # linear warm-up steps [2000]
    timestep: Timestep  # the student's timestep embedding [t_init 261; learned there]
    bins: Annotated[int, Field(ge=1)]  # teacher timesteps per image, stratified [3]
    seed: int  # [42]
    threads: Annotated[int, Field(ge=0)]  # torch CPU threads (0: torch's default)


def check_unet_source(unet: str | None, cleandift_steps: int) -> None:
    """model.unet names this stage's output while the stage runs, or a UNet that exists."""
    if unet is None:
        return
    if unet == CLEANDIFT_UNET:
        if cleandift_steps == 0:
            raise ConfigError(
                f"model.unet {unet}: the cleandift stage writes it only with cleandift.steps > 0"
            )
        return
    path = Path(unet)
    if not ((path / "config.json").is_file() or (path.is_file() and path.suffix == ".safetensors")):
        raise ConfigError(
            f"model.unet {unet}: not a diffusers UNet folder (with config.json) or a "
            f".safetensors file"
        )


def optimiser(
    params: list[torch.nn.Parameter], cfg: CleanDiftConfig
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """CleanDIFT's: Adam, and transformers' constant schedule after a linear warm-up from 0
    (train.py:28-36, `constant_with_warmup`)."""
    opt = torch.optim.Adam(params, lr=cfg.lr)
    return opt, get_constant_schedule_with_warmup(opt, cfg.warmup)


def run(
    cfg: CleanDiftConfig,
    model_cfg: ModelConfig,
    model_dir: str,
    encoded_dir: str,
    out: str,
    metrics_path: str,
) -> None:
    """The cleandift stage: data/cleandift/unet (a diffusers UNet folder) and its metrics."""
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if cfg.steps == 0:
            (tmp / NOTE).write_text("cleandift.steps is 0: no fine-tuning\n")
            write_json(metrics_path, {"steps": 0})
            print("cleandift: nothing to do (cleandift.steps 0)")
            return
        write_json(metrics_path, fine_tune(cfg, model_cfg, model_dir, encoded_dir, tmp / "unet"))


def fine_tune(
    cfg: CleanDiftConfig,
    model_cfg: ModelConfig,
    model_dir: str,
    encoded_dir: str,
    unet_dir: Path,
) -> dict[str, object]:
    """Train the student, save it to `unet_dir`; return the loss record and the time taken."""
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(model_cfg.device, "model.device")
    model = load_diffusion_model(model_dir, model_cfg.dtype, device, ("unet", "text_encoder"))
    teacher = model.unet
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    taps = resolve_taps(teacher, "cleandift", model.vae_stride)
    heads = ProjectionHeads({t.name: t.channels for t in taps}).to(device)
    latents, context = _source_latents(model, encoded_dir)
    params = [*student.parameters(), *heads.parameters()]
    opt, sched = optimiser(params, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    start = time.perf_counter()
    for _ in tqdm(range(cfg.steps), desc="cleandift", unit="step"):
        rows = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        x0 = latents[rows].to(device, model.dtype)
        t = stratified_timesteps(cfg.batch_size, cfg.bins, T_MIN, T_MAX, gen).reshape(-1)
        # The teacher sees each image at `bins` noisy timesteps; the student sees it clean once.
        x0_rep = x0.repeat_interleave(cfg.bins, dim=0)
        noise = torch.randn(x0_rep.shape, generator=gen).to(device, model.dtype)
        with torch.no_grad():
            x_t = model.scheduler.add_noise(x0_rep, noise, t.to(device))
            target = unet_features(model, x_t, t.to(device), context, taps)
        clean = unet_features(model, x0, cfg.timestep, context, taps, unet=student)
        # CleanDIFT runs its student on the bins copies of x_0 (sd_feature_extraction.py:370,
        # 391); the copies are equal, so one pass and a repeat give the same loss and gradient.
        clean = {k: v.repeat_interleave(cfg.bins, dim=0) for k, v in clean.items()}
        loss = alignment_loss(heads(clean, t.to(device)), target)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    student.requires_grad_(False).eval()
    student.save_pretrained(str(unet_dir), safe_serialization=True)
    record_fingerprint(unet_dir)
    tenth = max(1, len(losses) // 10)
    return {
        "steps": cfg.steps,
        "images": len(latents),
        "taps": [t.name for t in taps],
        "loss_first": round(float(np.mean(losses[:tenth])), 5),
        "loss_last": round(float(np.mean(losses[-tenth:])), 5),
        # the curve in tenths (metrics only: an empty dvclive folder at steps 0 is not in git)
        "loss_by_tenth": [
            round(float(np.mean(losses[i : i + tenth])), 5) for i in range(0, len(losses), tenth)
        ],
        "seconds": round(seconds, 1),
        "unet_passes": cfg.steps * cfg.batch_size * (cfg.bins + 1),
    }


def _source_latents(model: DiffusionModel, encoded_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The source's training latents (draw 0) and the caption: the first prompt variant's
    text (CleanDIFT trains with captions, use_text_condition: true), "" for a placeholder."""
    index = read_index(encoded_dir)
    found = split_rows(index, source_domain(index), "train")
    if found is None:
        raise StoreError(f"{encoded_dir}: no source training images to fine-tune on")
    name, rows = found
    latents = torch.from_numpy(read_whole(open_latents(encoded_dir, name), (slice(None), 0))[rows])
    prompts = read_prompts(encoded_dir)
    if prompts.texts[0].startswith("<"):
        context = encode_text(model, [""])
    else:
        context = prompts.embeddings[:1]
    return latents.float(), context.to(model.device, model.dtype)
