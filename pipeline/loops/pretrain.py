"""Pretrain the small SD-family model as text-to-image on unlabeled images of every domain."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from pydantic import Field
from pydantic.dataclasses import dataclass
from tqdm import tqdm

from dvclive import Live
from pipeline.core.device import set_threads
from pipeline.core.fileio import atomic_path, write_json
from pipeline.core.params import STRICT, Resolution
from pipeline.data.datasets import SyntheticConfig
from pipeline.data.images import canvas_tensor, fit, load_image
from pipeline.data.manifest import build_index
from pipeline.data.synthetic import SceneGenerator
from pipeline.diffusion.model import (
    DiffusionModel,
    fingerprint,
    is_pointer,
    load_diffusion_model,
    save_diffusion_model,
)
from pipeline.diffusion.noising import denoising_target
from pipeline.diffusion.text import encode_text
from pipeline.reporting.live import open_live

Positive = Annotated[int, Field(ge=1)]
Steps = Annotated[int, Field(ge=0)]
Rate = Annotated[float, Field(gt=0)]

# Captions name the scene and the condition, as web captions did for SD (issue 8).
DOMAIN_CAPTIONS: dict[str, tuple[str, ...]] = {
    "game": ("a street scene, video game", "a video game frame of a city street"),
    "real": ("a street scene, photo", "a photo of a city street"),
    "fog": ("a street scene, in fog", "a photo of a city street in fog"),
    "night": ("a street scene, at night", "a photo of a city street at night"),
    "rain": ("a street scene, in rain", "a photo of a city street in rain"),
    "snow": ("a street scene, in snow", "a photo of a city street in snow"),
}


def captions_for(domain: str) -> tuple[str, ...]:
    """The captions of a domain's images (a generic one for domains not listed)."""
    return DOMAIN_CAPTIONS.get(domain, (f"a street scene, {domain}",))


@dataclass(config=STRICT)
class PretrainConfig:
    """The `pretrain` group."""

    steps: Steps  # UNet (+ text encoder) denoising steps; 0 keeps the random init
    # diffusion: the denoising loss (SD's); masked: the same UNet as a masked autoencoder of
    # the latents (t = 0, 75 % of 2x2 latent patches zeroed, MSE on them): the non-diffusion
    # self-supervised backbone of equal size, data and steps
    objective: Literal["diffusion", "masked"]
    resolution: Resolution  # (H, W) of the pretraining images
    # 0: the manifests' images; N: N fresh unlabeled scenes from the synthetic generator, in
    # the manifests' domain proportions (disjoint from the benchmark's scenes)
    scenes: Steps
    batch_size: Positive
    lr: Rate
    vae_steps: Steps  # VAE reconstruction (+ KL) steps on crops, before the UNet
    vae_batch_size: Positive
    vae_lr: Rate
    vae_crop: Positive  # the VAE is convolutional: crops train it far cheaper than full frames
    kl_weight: Annotated[float, Field(ge=0)]
    caption_dropout: Annotated[float, Field(ge=0, le=1)]  # share of empty captions
    train_text_encoder: bool
    warmup: Steps
    sample_steps: Positive  # DDIM steps of the sample grid
    guidance: Annotated[float, Field(ge=0)]
    samples_per_caption: Positive
    seed: int
    # Float reductions are split by thread count, so the weights depend on it (bit-identical
    # for a fixed count, measured); 0 = torch's default, fastest but machine-dependent.
    threads: Annotated[int, Field(ge=0)]


@dataclasses.dataclass
class PretrainLog:
    """Per-step losses of both phases (to dvclive as they come), and what the metrics file
    reports."""

    vae_loss: list[float] = dataclasses.field(default_factory=list)
    unet_loss: list[float] = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    live: Live | None = None

    def record(self, name: str, value: float) -> None:
        """One step's loss of the VAE ("vae_loss") or the UNet ("loss")."""
        losses = self.vae_loss if name == "vae_loss" else self.unet_loss
        if self.live is not None:
            self.live.step = len(losses)
            self.live.log_metric(name, value)
            self.live.make_summary()
        losses.append(value)

    def metrics(self, model: DiffusionModel) -> dict[str, object]:
        def mean(xs: list[float], last: bool) -> float | None:
            part = xs[-50:] if last else xs[:50]
            return round(float(np.mean(part)), 5) if part else None

        return {
            "vae_loss_first50": mean(self.vae_loss, False),
            "vae_loss_last50": mean(self.vae_loss, True),
            "denoise_loss_first50": mean(self.unet_loss, False),
            "denoise_loss_last50": mean(self.unet_loss, True),
            "steps": len(self.unet_loss),
            "vae_steps": len(self.vae_loss),
            "scaling_factor": round(float(model.vae.config.scaling_factor), 5),
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
        }


def train_vae(
    model: DiffusionModel, images: torch.Tensor, cfg: PretrainConfig, log: PretrainLog
) -> None:
    """Reconstruction (MSE) + small KL on random crops of uint8 images (N, 3, H, W)."""
    vae = model.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    crop = min(cfg.vae_crop, images.shape[2], images.shape[3])
    for _ in tqdm(range(cfg.vae_steps), desc="pretrain vae", mininterval=5):
        x = _random_crops(images, cfg.vae_batch_size, crop, gen)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(gen)).sample
        loss = F.mse_loss(recon, x) + cfg.kl_weight * dist.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.record("vae_loss", loss.item())
    vae.eval().requires_grad_(False)


@torch.no_grad()
def posterior(model: DiffusionModel, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """VAE posterior (mean, std) of all images, unscaled: (N, 2, C, h, w)."""
    out = []
    for i in range(0, len(images), batch):
        dist = model.vae.encode(_to_float(images[i : i + batch])).latent_dist
        out.append(torch.stack([dist.mean, dist.std], 1))
    return torch.cat(out)


def set_scaling_factor(model: DiffusionModel, moments: torch.Tensor) -> float:
    """Unit-variance latents, as SD chose its 0.18215: 1 / std of posterior samples."""
    samples = moments[:, 0] + moments[:, 1] * torch.randn_like(moments[:, 0])
    factor = round(float(1.0 / samples.std()), 5)
    model.vae.register_to_config(scaling_factor=factor)
    return factor


def train_unet(
    model: DiffusionModel,
    moments: torch.Tensor,
    captions: Sequence[tuple[str, ...]],
    cfg: PretrainConfig,
    log: PretrainLog,
) -> None:
    """Denoising loss on VAE latents, target per prediction type; text encoder trained alongside."""
    unet, text = model.unet.train().requires_grad_(True), model.text_encoder
    params = list(unet.parameters())
    if cfg.train_text_encoder:
        text.train().requires_grad_(True)
        params += list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed)
    factor = model.vae.config.scaling_factor
    n_train = model.scheduler.config.num_train_timesteps
    for _ in tqdm(range(cfg.steps), desc="pretrain unet", mininterval=5):
        idx = torch.randint(0, len(moments), (cfg.batch_size,), generator=gen)
        m = moments[idx]
        x0 = (m[:, 0] + m[:, 1] * torch.randn(m[:, 0].shape, generator=gen)) * factor
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, n_train, (len(x0),), generator=gen)
        if cfg.objective == "masked":
            t = torch.zeros_like(t)
            keep = masked_patches(x0.shape, gen)
            noisy = x0 * keep
        else:
            noisy = model.scheduler.add_noise(x0, noise, t)
        batch_captions = [
            "" if rng.random() < cfg.caption_dropout else str(rng.choice(captions[i]))
            for i in idx.tolist()
        ]
        # Encode each distinct caption once per step (there are few), then index.
        unique = sorted(set(batch_captions))
        with torch.set_grad_enabled(cfg.train_text_encoder):
            table = encode_text(model, unique)
        # A one-hot matmul, not table[idx]: indexing's backward accumulates with atomics on
        # a multi-threaded CPU, which made the text encoder's weights differ run to run.
        pick = F.one_hot(torch.tensor([unique.index(c) for c in batch_captions]), len(unique))
        context = torch.einsum("bu,usd->bsd", pick.to(table.dtype), table)
        pred = unet(noisy, t, context).sample
        if cfg.objective == "masked":  # reconstruct what was hidden (MAE, SimMIM)
            hidden = (1 - keep).expand_as(x0)
            loss = ((pred - x0) ** 2 * hidden).sum() / hidden.sum().clamp_min(1)
        else:
            loss = F.mse_loss(pred, denoising_target(model, x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log.record("loss", loss.item())
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)


def masked_patches(
    shape: torch.Size, gen: torch.Generator, patch: int = 2, ratio: float = 0.75
) -> torch.Tensor:
    """A keep mask (B, 1, h, w) hiding `ratio` of the patch x patch cells of each latent."""
    b, _, h, w = shape
    cells = torch.rand(b, 1, -(-h // patch), -(-w // patch), generator=gen) >= ratio
    keep = cells.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :h, :w]
    return keep.float()


def pretrain(
    model: DiffusionModel,
    images: torch.Tensor,
    domains: Sequence[str],
    cfg: PretrainConfig,
    live: Live | None = None,
) -> PretrainLog:
    """Train VAE, then UNet (+ text encoder) in place on uint8 images (N, 3, H, W) of `domains`;
    the losses to `live` (dvclive) step by step."""
    torch.manual_seed(cfg.seed)
    log = PretrainLog(live=live)
    start = time.perf_counter()
    if cfg.vae_steps > 0:
        train_vae(model, images, cfg, log)
    log.seconds["vae"] = time.perf_counter() - start
    if cfg.steps > 0:
        moments = posterior(model, images)
        if cfg.vae_steps > 0:
            set_scaling_factor(model, moments)
        start = time.perf_counter()
        train_unet(model, moments, [captions_for(d) for d in domains], cfg, log)
        log.seconds["unet"] = time.perf_counter() - start
    return log


@torch.no_grad()
def sample(
    model: DiffusionModel,
    prompts: list[str],
    latent_hw: tuple[int, int],
    steps: int,
    guidance: float,
    seed: int,
) -> torch.Tensor:
    """DDIM text-to-image samples with classifier-free guidance (diffusers' pipeline), uint8."""
    stride = model.vae_stride
    images = model.pipeline()(
        prompts,
        height=latent_hw[0] * stride,
        width=latent_hw[1] * stride,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def _random_crops(
    images: torch.Tensor, batch: int, crop: int, gen: torch.Generator
) -> torch.Tensor:
    idx = torch.randint(0, len(images), (batch,), generator=gen).tolist()
    ys = torch.randint(0, images.shape[2] - crop + 1, (batch,), generator=gen).tolist()
    xs = torch.randint(0, images.shape[3] - crop + 1, (batch,), generator=gen).tolist()
    crops = [images[i, :, y : y + crop, x : x + crop] for i, y, x in zip(idx, ys, xs, strict=True)]
    return _to_float(torch.stack(crops))


def load_images(
    manifest_paths: Sequence[str | os.PathLike[str]], resolution: Sequence[int]
) -> tuple[torch.Tensor, list[str]]:
    """Every manifest's images (labels unused) at (H, W) as uint8 (N, 3, H, W), and their domains."""
    index = build_index(manifest_paths)
    images = [
        load_image(p, resolution).add(1).mul(127.5).round().to(torch.uint8)
        for p in tqdm(index["image"], desc="pretrain images", mininterval=5)
    ]
    return torch.stack(images), [str(d) for d in index["domain"]]


def fresh_scenes(
    n: int, domains: Sequence[str], synthetic: SyntheticConfig, resolution: Sequence[int]
) -> tuple[torch.Tensor, list[str]]:
    """`n` new scenes (split "pretrain": layouts the benchmark never uses), drawn in the
    proportions of `domains`, at (H, W) as uint8 (N, 3, H, W), and their domains."""
    names, counts = np.unique(np.asarray(domains), return_counts=True)
    share = np.floor(counts / counts.sum() * n).astype(int)
    share[np.argmax(share)] += n - share.sum()
    gen = SceneGenerator(synthetic.height, synthetic.width, synthetic.seed)
    images, out_domains = [], []
    with tqdm(total=n, desc="pretrain scenes", mininterval=5) as bar:
        for name, k in zip(names, share, strict=True):
            for i in range(int(k)):
                image, _ = gen.sample(i, str(name), "pretrain")
                x = canvas_tensor(fit(image, resolution), resolution)
                images.append(x.add(1).mul(127.5).round().to(torch.uint8))
                out_domains.append(str(name))
                bar.update()
    return torch.stack(images), out_domains


def write_plots(
    model: DiffusionModel | None,
    images: torch.Tensor | None,
    domains: Sequence[str],
    cfg: PretrainConfig,
    out_dir: str | os.PathLike[str],
) -> None:
    """samples.png: per caption a real image and samples (the loss curves are dvclive's)."""
    out_dir = Path(out_dir)
    if images is None or not domains:
        text_png("external model: not pretrained here", out_dir / "samples.png")
        return
    names = sorted(set(domains))
    prompts = [captions_for(d)[0] for d in names] + [""]
    stride = model.vae_stride
    hw = (images.shape[2] // stride, images.shape[3] // stride)
    n = cfg.samples_per_caption
    grid = sample(
        model, [p for p in prompts for _ in range(n)], hw, cfg.sample_steps, cfg.guidance, cfg.seed
    )
    rows = []
    for r in range(len(prompts)):
        ref = images[domains.index(names[r])] if r < len(names) else None
        rows.append([ref] + [grid[r * n + c] for c in range(n)])
    sample_grid_png(rows, prompts, out_dir / "samples.png")


def run(
    cfg: PretrainConfig,
    synthetic: SyntheticConfig,
    model_init: str,
    manifests_dir: str,
    out: str,
    metrics_path: str,
    plots_dir: str,
    live_dir: str,
) -> None:
    """The pretrain stage; an external model (a pointer: SD-2.1) passes through untrained.
    The loss curves go to dvclive in `live_dir`."""
    start = time.perf_counter()
    set_threads(cfg.threads)
    live = open_live(live_dir)
    if is_pointer(model_init):
        with atomic_path(out) as tmp:
            shutil.copytree(model_init, tmp)
        write_plots(None, None, [], cfg, plots_dir)
        live.end()
        write_json(metrics_path, {"fingerprint": fingerprint(model_init)})
        print(f"pretrain: {model_init} is an external model, passed through untrained")
        return
    manifests = sorted(Path(manifests_dir).glob("*.parquet"))
    images, domains = load_images(manifests, cfg.resolution)
    if cfg.scenes:
        images, domains = fresh_scenes(cfg.scenes, domains, synthetic, cfg.resolution)
    model = load_diffusion_model(model_init)
    log = pretrain(model, images, domains, cfg, live)
    live.end()
    fp = save_diffusion_model(model, out)
    write_plots(model, images, domains, cfg, plots_dir)
    metrics = {"fingerprint": fp, "images": len(images), **log.metrics(model)}
    metrics["seconds"]["total"] = round(time.perf_counter() - start, 1)
    write_json(metrics_path, metrics)
    print(
        f"pretrain: {len(images)} images, {cfg.steps} steps -> {out} ({fp}), "
        f"{time.perf_counter() - start:.1f} s"
    )


def text_png(text: str, path: str | os.PathLike[str]) -> None:
    """A figure holding one line of text (a placeholder where there is nothing to draw)."""
    fig = Figure(figsize=(4, 1))
    fig.text(0.5, 0.5, text, ha="center", va="center")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def sample_grid_png(
    rows: Sequence[Sequence[torch.Tensor | None]],
    prompts: Sequence[str],
    path: str | os.PathLike[str],
) -> None:
    """One row per prompt: a real image (or nothing) then samples, uint8 (3, H, W) each."""
    cols = max(len(r) for r in rows)
    fig = Figure(figsize=(2.2 * cols, 1.4 * len(rows)))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        for c, img in enumerate(row):
            axes[r][c].axis("off")
            if img is not None:
                axes[r][c].imshow(img.permute(1, 2, 0).numpy())
        axes[r][0].set_title("real" if row[0] is not None else "", fontsize=7)
        axes[r][1].set_title(f'"{prompt}"', fontsize=7, loc="left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
