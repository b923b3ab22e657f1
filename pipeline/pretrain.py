"""Pretrain the small SD-family model as text-to-image on unlabeled images of every domain."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.diffusion import DiffusionModel, denoising_target, encode_prompts
from pipeline.encode import build_index, load_image
from pipeline.fileio import atomic_path

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


@dataclasses.dataclass
class PretrainConfig:
    """params.yaml `pretrain` group."""

    steps: int = 500  # UNet (+ text encoder) denoising steps; 0 keeps the random init
    batch_size: int = 16
    lr: float = 3e-4
    vae_steps: int = 150
    vae_batch_size: int = 8
    vae_lr: float = 1e-3
    vae_crop: int = 64  # the VAE is convolutional: it trains on crops, far cheaper than full frames
    kl_weight: float = 1e-4
    caption_dropout: float = 0.1  # empty captions: the empty prompt is the extraction default
    train_text_encoder: bool = True
    warmup: int = 50
    sample_steps: int = 20
    guidance: float = 3.0
    samples_per_caption: int = 4
    seed: int = 0
    # Float reductions are split by thread count, so the weights depend on it (bit-identical
    # for a fixed count, measured); 0 = torch's default, fastest but machine-dependent.
    threads: int = 2


@dataclasses.dataclass
class PretrainLog:
    """Per-step losses of both phases, and what the metrics file reports."""

    vae_loss: list[float] = dataclasses.field(default_factory=list)
    unet_loss: list[float] = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

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
            "prediction_type": model.prediction_type,
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
        log.vae_loss.append(loss.item())
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
        noisy = model.scheduler.add_noise(x0, noise, t)
        batch_captions = [
            "" if rng.random() < cfg.caption_dropout else str(rng.choice(captions[i]))
            for i in idx.tolist()
        ]
        # Encode each distinct caption once per step (there are few), then index.
        unique = sorted(set(batch_captions))
        with torch.set_grad_enabled(cfg.train_text_encoder):
            table = encode_prompts(model, unique)
        # A one-hot matmul, not table[idx]: indexing's backward accumulates with atomics on
        # a multi-threaded CPU, which made the text encoder's weights differ run to run.
        pick = F.one_hot(torch.tensor([unique.index(c) for c in batch_captions]), len(unique))
        context = torch.einsum("bu,usd->bsd", pick.to(table.dtype), table)
        pred = unet(noisy, t, context).sample
        loss = F.mse_loss(pred, denoising_target(model, x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log.unet_loss.append(loss.item())
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)


def pretrain(
    model: DiffusionModel, images: torch.Tensor, domains: Sequence[str], cfg: PretrainConfig
) -> PretrainLog:
    """Train VAE, then UNet (+ text encoder) in place on uint8 images (N, 3, H, W) of `domains`."""
    torch.manual_seed(cfg.seed)
    log = PretrainLog()
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
    steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
) -> torch.Tensor:
    """DDIM text-to-image samples with classifier-free guidance, as uint8 (P, 3, H, W)."""
    scheduler = type(model.scheduler).from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    channels = model.unet.config.in_channels
    latents = torch.randn((len(prompts), channels, *latent_hw), generator=gen)
    cond = encode_prompts(model, prompts)
    uncond = encode_prompts(model, [""]).expand_as(cond)
    context = torch.cat([uncond, cond])
    for t in scheduler.timesteps:
        out = model.unet(torch.cat([latents, latents]), t, context).sample
        out_u, out_c = out.chunk(2)
        # Guidance mixes model outputs linearly; valid for ε and v alike.
        latents = scheduler.step(out_u + guidance * (out_c - out_u), t, latents).prev_sample
    images = model.vae.decode(latents / model.vae.config.scaling_factor).sample
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


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


def write_plots(
    model: DiffusionModel,
    log: PretrainLog | None,
    images: torch.Tensor | None,
    domains: Sequence[str],
    cfg: PretrainConfig,
    out_dir: str | os.PathLike[str],
) -> None:
    """loss.csv (denoising), vae_loss.csv, and samples.png: per caption a real image and samples."""
    out_dir = Path(out_dir)
    for name, losses in (
        ("loss", log.unet_loss if log else []),
        ("vae_loss", log.vae_loss if log else []),
    ):
        with atomic_path(out_dir / f"{name}.csv") as tmp:
            tmp.write_text("step,loss\n" + "".join(f"{i},{v:.6f}\n" for i, v in enumerate(losses)))
    with atomic_path(out_dir / "samples.png") as tmp:
        if images is None or not domains:
            _text_figure("external model: not pretrained here", tmp)
        else:
            _samples_figure(model, images, domains, cfg, tmp)


def _samples_figure(
    model: DiffusionModel,
    images: torch.Tensor,
    domains: Sequence[str],
    cfg: PretrainConfig,
    dest: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(set(domains))
    prompts = [captions_for(d)[0] for d in names] + [""]
    stride = model.vae_stride
    hw = (images.shape[2] // stride, images.shape[3] // stride)
    n = cfg.samples_per_caption
    grid = sample(
        model, [p for p in prompts for _ in range(n)], hw, cfg.sample_steps, cfg.guidance, cfg.seed
    )
    fig, axes = plt.subplots(
        len(prompts), n + 1, figsize=(2.2 * (n + 1), 1.4 * len(prompts)), squeeze=False
    )
    for r, prompt in enumerate(prompts):
        ref = images[domains.index(names[r])] if r < len(names) else None
        row = [ref] + [grid[r * n + c] for c in range(n)]
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.axis("off")
            if img is not None:
                ax.imshow(img.permute(1, 2, 0).numpy())
        axes[r][0].set_title("real" if r < len(names) else "", fontsize=7)
        axes[r][1].set_title(f'"{prompt}"', fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(dest, dpi=100)
    plt.close(fig)


def _text_figure(text: str, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(4, 1))
    fig.text(0.5, 0.5, text, ha="center", va="center")
    fig.savefig(dest, dpi=100)
    plt.close(fig)
