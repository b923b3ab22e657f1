"""The encode loop: per domain, images fitted to the domain's canvas, their VAE latents (K draws)
and canvas-size labels; the prompt variants' embeddings; the global image index."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic.dataclasses import dataclass
from tqdm import tqdm

from pipeline.cache.encoded import (
    GEOMETRY_COLUMNS,
    INDEX_NAME,
    LABELS_NAME,
    LATENTS_NAME,
    PROMPTS_NAME,
    ROWS_PER_SHARD,
    Prompts,
    create_rows_array,
    domain_dir,
    index_fingerprint,
    write_prompts,
)
from pipeline.core.device import resolve_device
from pipeline.core.errors import DataError
from pipeline.core.fileio import atomic_path
from pipeline.core.params import STRICT, Positive, Resolution
from pipeline.data.augment import photometric_distortion
from pipeline.data.datasets import DataConfig
from pipeline.data.images import canvas_tensor, fit, fit_size, load_label, read_image
from pipeline.data.manifest import build_index
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.model import DiffusionModel, load_diffusion_model
from pipeline.diffusion.prompts import PromptConfig, text_of, variant_prompts
from pipeline.diffusion.text import encode_text


@dataclass(config=STRICT)
class EncodeConfig:
    """The `encode` group. What DIFF draws afresh every iteration becomes K cached draws."""

    resolution: Resolution  # the canvas (H, W) of a domain whose entry sets none
    batch_size: Positive
    draws: Positive  # K draws per image (V = prompt variants x K in the stores)
    posterior: Literal["mean", "sample"]  # sample: DIFF's VAE posterior sample (per draw)
    photometric: bool  # DIFF's PhotoMetricDistortion (GTA), one per draw of training images
    seed: int  # of posterior samples and distortions (with each image's content hash)


def draw_generator(sha256: str, what: str, draw: int, seed: int) -> torch.Generator:
    """A generator seeded by (image content, purpose, draw, seed): the same in any order."""
    key = f"{sha256}:{what}:{int(draw)}:{int(seed)}".encode()
    seed63 = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1
    return torch.Generator("cpu").manual_seed(seed63)


def encode_prompts(model: DiffusionModel, cfg: PromptConfig) -> Prompts:
    """The prompt variants of `cfg` with their text-encoder embeddings, in store order."""
    texts = variant_prompts(cfg)
    with torch.inference_mode():
        emb = encode_text(model, [text_of(t)[0] for t in texts.values()])
    return Prompts(list(texts), list(texts.values()), emb, model.fingerprint)


def encoding_attrs(cfg: EncodeConfig) -> dict:
    """What a domain's latents depend on besides the model and images (a store records it)."""
    return {
        "draws": cfg.draws,
        "posterior": cfg.posterior,
        "photometric": cfg.photometric,
        "seed": cfg.seed,
    }


def _draw_images(
    path: str, sha: str, split: str, canvas: list[int], cfg: EncodeConfig
) -> list[torch.Tensor]:
    fitted = fit(read_image(path, sha), canvas)
    out = []
    for k in range(cfg.draws):
        img = fitted
        if cfg.photometric and split == "train":  # mmseg distorts training images only
            seed = int(draw_generator(sha, "photometric", k, cfg.seed).initial_seed())
            img = photometric_distortion(fitted, np.random.default_rng(seed))
        out.append(canvas_tensor(img, canvas))
    return out


@torch.inference_mode()
def _latents(model: DiffusionModel, images: torch.Tensor, shas: list[str], cfg: EncodeConfig):
    """(B*K, 3, H, W) images, K per sha in order -> (B, K, C, h, w) latents x scaling factor."""
    dist = model.vae.encode(images.to(model.vae.device, model.vae.dtype)).latent_dist
    z = dist.mean.float()
    if cfg.posterior == "sample":
        eps = torch.stack(
            [
                torch.randn(z.shape[1:], generator=draw_generator(sha, "posterior", k, cfg.seed))
                for sha in shas
                for k in range(cfg.draws)
            ]
        )
        z = z + dist.std.float() * eps.to(z.device)
    z = z * model.vae.config.scaling_factor
    return z.view(len(shas), cfg.draws, *z.shape[1:]).cpu().numpy()


def encode_domain(
    model: DiffusionModel, rows: pd.DataFrame, canvas: list[int], out: Path, cfg: EncodeConfig
) -> pd.DataFrame:
    """One domain's latents and labels under `out`; returns its rows with their geometry."""
    h, w = canvas
    stride = model.pixel_multiple  # SD: latents halve three times in the UNet, 64 pixels
    if h % stride or w % stride:
        raise DataError(
            f"resolution {canvas} of domain {rows['domain'].iloc[0]!r} must be a "
            f"multiple of {stride}"
        )
    n = len(rows)
    attrs = {
        "model_fingerprint": model.fingerprint,
        "resolution": [h, w],
        "images": index_fingerprint(rows["sha256"]),
        "encoding": encoding_attrs(cfg),
    }
    c = model.vae.config.latent_channels
    f = model.vae_stride
    latents = create_rows_array(
        out / LATENTS_NAME, (n, cfg.draws, c, h // f, w // f), "float32", attrs
    )
    labels = create_rows_array(out / LABELS_NAME, (n, h, w), "uint8", attrs)
    geometry = []
    domain = rows["domain"].iloc[0]
    with tqdm(total=n, desc=f"encode {domain}", unit="img") as bar:
        # Shard-aligned: each shard file is written once, whole.
        for s0 in range(0, n, ROWS_PER_SHARD):
            s1 = min(s0 + ROWS_PER_SHARD, n)
            lat = np.empty((s1 - s0, *latents.shape[1:]), np.float32)
            lab = np.empty((s1 - s0, h, w), np.uint8)
            for b0 in range(s0, s1, cfg.batch_size):
                b1 = min(b0 + cfg.batch_size, s1)
                batch = rows.iloc[b0:b1]
                shas = [str(s) for s in batch["sha256"]]
                imgs = [
                    t
                    for p, sha, split in zip(batch["image"], shas, batch["split"], strict=True)
                    for t in _draw_images(p, sha, split, canvas, cfg)
                ]
                lat[b0 - s0 : b1 - s0] = _latents(model, torch.stack(imgs), shas, cfg)
                for j, (p, hh, ww) in enumerate(
                    zip(batch["label"], batch["height"], batch["width"], strict=True)
                ):
                    lab[b0 - s0 + j] = load_label(p, canvas)
                    geometry.append([h, w, *fit_size(int(hh), int(ww), canvas)])
                bar.update(b1 - b0)
            latents[s0:s1] = lat
            labels[s0:s1] = lab
    return rows.assign(**dict(zip(GEOMETRY_COLUMNS, np.asarray(geometry).T, strict=True)))


def encode_dataset(
    model: DiffusionModel,
    index: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    cfg: EncodeConfig,
    prompts: Prompts,
    resolutions: dict[str, list[int]],
) -> None:
    """Write out_dir/{index.parquet, <domain>/latents.zarr, <domain>/labels.zarr,
    prompts.safetensors} atomically; `resolutions` gives each domain's canvas."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        parts = []
        for domain in sorted(set(index["domain"])):
            rows = index[index["domain"] == domain].reset_index(drop=True)
            canvas = resolutions.get(domain, cfg.resolution)
            (domain_dir(tmp, domain)).mkdir()
            parts.append(encode_domain(model, rows, list(canvas), domain_dir(tmp, domain), cfg))
        full = pd.concat(parts, ignore_index=True)
        full[GEOMETRY_COLUMNS] = full[GEOMETRY_COLUMNS].astype("int64")
        full.to_parquet(tmp / INDEX_NAME, index=False)
        write_prompts(prompts, tmp / PROMPTS_NAME)


def check_paths(
    index: pd.DataFrame, data: DataConfig, datasets_dir: str | os.PathLike[str]
) -> None:
    """Every image inside its domain's dataset root, every label there or in the prepared
    labels folder: a manifest cannot send encode elsewhere (absolute paths, `..`, links)."""
    entries = {data.source_name: data.source, **data.targets}
    prepared = Path(datasets_dir).resolve()
    for domain, rows in index.groupby("domain"):
        if domain not in entries:
            raise DataError(
                f"manifest of domain {domain!r}: not a domain of params `data` "
                f"({sorted(entries)}); rerun prepare"
            )
        root = Path(entries[domain].root).resolve()
        for image, label in zip(rows["image"], rows["label"], strict=True):
            if not Path(image).resolve().is_relative_to(root):
                raise DataError(
                    f"manifest of {domain}: image {image} lies outside the dataset root {root}"
                )
            lab = Path(label).resolve()
            if not (lab.is_relative_to(root) or lab.is_relative_to(prepared)):
                raise DataError(
                    f"manifest of {domain}: label {label} lies outside {root} and {prepared}"
                )


def run(
    cfg: EncodeConfig,
    prompts: PromptConfig,
    data: DataConfig,
    model_cfg: ModelConfig,
    manifests_dir: str,
    datasets_dir: str,
    model_dir: str,
    out: str,
) -> None:
    """The encode stage: the VAE and text encoder only (the UNet is not needed here)."""
    manifests = sorted(Path(manifests_dir).glob("*.parquet"))
    index = build_index(manifests)  # bad manifests stop the stage before the model loads
    check_paths(index, data, datasets_dir)
    model = load_diffusion_model(
        model_dir, model_cfg.dtype, resolve_device(model_cfg.device), parts=("vae", "text_encoder")
    )
    resolutions = data.resolutions(cfg.resolution)
    encode_dataset(model, index, out, cfg, encode_prompts(model, prompts), resolutions)
    print(f"encoded {len(index)} images from {len(manifests)} manifests -> {out}")
