"""Shared test helpers: configs from the project's own params.yaml, a tiny saved SD-family
model, a fake data/encoded, and store identities."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
import yaml

from pipeline.cache.encoded import (
    LABELS_NAME,
    LATENTS_NAME,
    PROMPTS_NAME,
    Prompts,
    create_rows_array,
    index_fingerprint,
    open_labels,
    open_latents,
    read_index,
    read_prompts,
    set_index,
    write_index,
    write_prompts,
)
from pipeline.cache.preload import LoaderConfig
from pipeline.cache.storage import parse_storage
from pipeline.cache.store import StoreIdentity, StoreLayout
from pipeline.core.classes import NUM_CLASSES
from pipeline.core.fileio import MARKER
from pipeline.core.params import load_params, read_group
from pipeline.data.sampling import SamplingConfig, pixel_counts
from pipeline.diffusion.build import SmallModelConfig, build_small_model
from pipeline.diffusion.model import DiffusionModel, save_diffusion_model
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.text import encode_text
from pipeline.extraction.extractor import Extractor, SetInputs
from pipeline.extraction.noise import noise_mode
from pipeline.extraction.recipe import FeatureRecipe
from pipeline.heads.decoders import DAFORMER_DILATIONS, HeadConfig
from pipeline.heads.fusion import FusionConfig
from pipeline.loops.extract import extract_store
from pipeline.loops.train import OUT_STRIDES

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")
T = TypeVar("T")


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in, nested dicts key by key (a copy)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def params(**groups: Any) -> dict[str, Any]:
    """The project's params.yaml with groups overridden (nested dicts merged)."""
    return merge(PARAMS, groups)


def config(group: str, cls: type[T], **over: Any) -> T:
    """Group `group` of params.yaml, some keys overridden, validated as the stages do."""
    return read_group(params(**{group: over}), group, cls)


def sampling(**over: Any) -> SamplingConfig:
    """The `sampling` group of params.yaml, some keys overridden."""
    return config("sampling", SamplingConfig, **over)


def loader(**over: Any) -> LoaderConfig:
    """The `loader` group of params.yaml, some keys overridden."""
    return config("loader", LoaderConfig, **over)


def write_params(path: Path, **groups: Any) -> Path:
    """A full params.yaml at `path` with some groups overridden."""
    path.write_text(yaml.safe_dump(params(**groups), sort_keys=False))
    return path


TINY = dict(
    vae_channels=[8, 8, 8, 8],
    unet_channels=[8, 16, 32, 32],
    unet_heads=[1, 1, 2, 2],
    norm_num_groups=4,
    text_hidden=16,
    text_layers=1,
    text_heads=1,
    sample_size=64,
)


def tiny_config(**over: Any) -> SmallModelConfig:
    """The smallest model of the SD-2.1 layout (seconds on a CPU), some keys overridden."""
    small = {**PARAMS["model"]["small"], **TINY, **over}
    return read_group({"small": small}, "small", SmallModelConfig)


# Two UNet levels: the store tests' model (a pass takes milliseconds).
STORE_MODEL = dict(unet_channels=[8, 16], unet_heads=[1, 2], sample_size=32)
RESOLUTION = (32, 64)


def tiny_model(path: Path | None = None, seed: int = 0, **over: Any) -> DiffusionModel:
    """A random tiny model; saved at `path` when given (a fingerprint; loads in subprocesses)."""
    model = build_small_model(tiny_config(**over), seed=seed)
    if path is not None:
        save_diffusion_model(model, path)
    return model


def store_model(path: Path) -> DiffusionModel:
    """The store tests' saved two-level model."""
    return tiny_model(path, **STORE_MODEL)


def encoded_prompts(model: DiffusionModel, names: list[str], texts: list[str]) -> Prompts:
    with torch.no_grad():
        return Prompts(names, texts, encode_text(model, texts), model.fingerprint)


def make_encoded(
    out: Path,
    model: DiffusionModel,
    n: int,
    prompts: tuple[str, ...] = ("",),
    seed: int = 0,
    names: tuple[str, ...] | None = None,
    draws: int = 1,
) -> pd.DataFrame:
    """A data/encoded folder with random latents and labels (no images): the first n - n // 3
    images are the source domain "game" (train), the rest the target "real" (val)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written as the encode stage writes it\n")  # atomic_path's mark
    h, w = RESOLUTION
    n_real = n // 3
    labels = {
        "game": rng.integers(0, 19, size=(n - n_real, h, w)).astype(np.uint8),
        "real": rng.integers(0, 19, size=(n_real, h, w)).astype(np.uint8),
    }
    index = pd.DataFrame(
        {
            "domain": ["game"] * (n - n_real) + ["real"] * n_real,
            "split": ["train"] * (n - n_real) + ["val"] * n_real,
            "image": [f"img{i}.png" for i in range(n)],
            "label": [f"lab{i}.png" for i in range(n)],
            "sha256": [hashlib.sha256(f"img{i}".encode()).hexdigest() for i in range(n)],
            "label_sha256": [hashlib.sha256(f"lab{i}".encode()).hexdigest() for i in range(n)],
            "height": h,
            "width": w,
            "set": ["game"] * (n - n_real) + ["real"] * n_real,
            "row": list(range(n - n_real)) + list(range(n_real)),
            "canvas_h": h,
            "canvas_w": w,
            "content_h": h,
            "content_w": w,
            "class_pixels": [pixel_counts(x) for x in [*labels["game"], *labels["real"]]],
        }
    )
    write_index(index, out)
    for domain in ("game", "real"):
        rows = index[index["domain"] == domain]
        m = len(rows)
        k = draws if domain == "game" else 1
        attrs = {
            "model_fingerprint": model.fingerprint,
            "resolution": [h, w],
            "images": index_fingerprint(rows["sha256"]),
            "encoding": {"draws": k},
        }
        (out / domain).mkdir()
        lat = create_rows_array(
            out / domain / LATENTS_NAME, (m, k, 4, h // 8, w // 8), "float32", attrs
        )
        lat[:] = rng.standard_normal(lat.shape).astype(np.float32)
        lab = create_rows_array(out / domain / LABELS_NAME, (m, h, w), "uint8", attrs)
        lab[:] = labels[domain]
    names = names or tuple(f"v{i}" for i in range(len(prompts)))
    write_prompts(encoded_prompts(model, list(names), list(prompts)), out / PROMPTS_NAME)
    return index


def store_inputs(encoded: Path, domain: str = "game") -> SetInputs:
    """The extraction inputs of one set of a make_encoded folder."""
    return SetInputs(
        set_index(read_index(encoded), domain),
        open_latents(encoded, domain),
        labels=open_labels(encoded, domain),
    )


def extract(
    model: DiffusionModel, encoded: Path, timestep: int, out: Path, cfg, domain: str = "game"
):
    """extract_store of one domain at one timestep, as the extract stage runs it."""

    prompts = read_prompts(encoded)
    inputs = store_inputs(encoded, domain)
    taps = resolve_taps(model.unet, cfg.taps, model.vae_stride)
    recipe = FeatureRecipe(
        taps,
        timestep,
        cfg.noise_seed,
        noise_mode(cfg.noise_mode),
        cfg.conditioning,
        parse_storage(cfg.storage),
    )
    ext = Extractor(model, recipe, prompts)
    # What the storage mode fits (PCA's components), None for the others.
    projections = ext.fit_projections(
        inputs, min(cfg.pca_fit_images, len(inputs.index)), cfg.pca_fit_pixels, cfg.batch_size
    )
    return extract_store(
        ext, inputs, prompts, out, cfg, "fp32", progress=False, projections=projections
    )


def shard_mb(
    images: int,
    model: DiffusionModel,
    taps: str | list[str] = "diff",
    storage: str = "fp16",
    variants: int = 1,
    resolution: tuple[int, int] = RESOLUTION,
) -> float:
    """The extract.shard_mb that makes shards of `images` images of `model`'s taps (with a
    batch no larger than that, or a multiple of it)."""
    resolved = resolve_taps(model.unet, taps, model.vae_stride)
    shapes = {
        t.name: (t.channels, resolution[0] // t.stride, resolution[1] // t.stride) for t in resolved
    }
    strides = {t.name: t.stride for t in resolved}
    one = StoreLayout.of(1, variants, shapes, strides, storage, 1)
    return (images + 0.5) * one.image_bytes() / 1e6


def encode_images(
    model: DiffusionModel, images: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """VAE latents × scaling_factor of images in [-1, 1], the posterior mean or a seeded sample:
    the reference encode's own latents are held to (one VAE call, as diffusers encodes)."""
    dist = model.vae.encode(images.to(model.vae.device, model.vae.dtype)).latent_dist
    latents = dist.mean if generator is None else dist.sample(generator)
    return latents * model.vae.config.scaling_factor


def identity(**kw: Any) -> StoreIdentity:
    """A store identity with test values, some fields overridden."""
    base = dict(
        model_fingerprint="m0",
        taps=("a", "b"),
        tap_modules=("up.a", "up.b"),
        timestep=50,
        noise_seed=0,
        noise_mode="add",
        trajectory="",
        conditioning="single",
        encoding="{}",
        images="img0",
        resolution=(32, 64),
        prompts=("",),
        draws=1,
        storage="fp16",
        compute_dtype="fp32",
        compression="none",
    )
    base.update(kw)
    if "taps" in kw and "tap_modules" not in kw:
        base["tap_modules"] = tuple(f"up.{t}" for t in base["taps"])
    return StoreIdentity(**base)


def fusion_config(**kw: Any) -> FusionConfig:
    """A FusionConfig with the default run's widths, some fields overridden."""
    base = dict(
        kind="stride",
        inputs={},
        out_strides=list(OUT_STRIDES),
        widths=list(PARAMS["train"]["widths"]),
        channels=PARAMS["train"]["hyper_channels"],
    )
    return FusionConfig(**{**base, **kw})


def head_config(**kw: Any) -> HeadConfig:
    """A HeadConfig with the default run's sizes, some fields overridden."""
    base = dict(
        kind="daformer",
        embed_dim=PARAMS["train"]["embed_dim"],
        dilations=list(DAFORMER_DILATIONS),
        dropout=0.1,
        num_classes=NUM_CLASSES,
        norm="gn",
    )
    return HeadConfig(**{**base, **kw})
