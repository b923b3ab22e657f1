"""The extraction loop: UNet taps of noised latents into a FeatureStore, whole shards, resumable.

Under torchrun each rank owns a disjoint contiguous range of the missing shards of one store
that rank 0 created at full size before a barrier (docs/architecture.md, "The feature store").
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import zarr
from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass
from tqdm import tqdm

from pipeline.cache.encoded import (
    Prompts,
    index_fingerprint,
    open_labels,
    open_latents,
    read_index,
    read_prompts,
)
from pipeline.cache.storage import fit_pca, parse_storage, reduce_features, sample_pixels
from pipeline.cache.store import FeatureStore, StoreIdentity
from pipeline.core.errors import ConfigError, StoreError
from pipeline.core.names import GUIDED_PROMPT
from pipeline.core.params import STRICT
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.features import guide_labels, placeholder_contexts
from pipeline.diffusion.model import DiffusionModel, load_diffusion_model
from pipeline.diffusion.taps import PRESETS, Tap, resolve_taps
from pipeline.loops.features import FeatureRecipe, store_projections, tap_maps

Positive = Annotated[int, Field(ge=1)]


@dataclass(config=STRICT)
class ExtractConfig:
    """The `extract` group (each extract@t stage gets its timestep with --timestep)."""

    taps: str | list[str]  # a preset (diff | hyperfeatures | vpd | dift) or UNet module paths
    batch_size: Positive  # performance only (batches never span shards)
    noise_seed: int
    noise_mode: Literal["add", "ddim_inversion"]
    inversion_steps: Positive  # UNet passes of ddim_inversion
    draws: Positive  # noise draws per image (V = prompt variants x draws)
    storage: Annotated[str, Field(pattern=r"^(fp16|int8|pca-[1-9][0-9]*)$")]
    images_per_shard: Positive
    pca_fit_images: Positive  # PCA fitted on a pixel sample of the first images
    pca_fit_pixels: Positive

    @field_validator("taps")
    @classmethod
    def _taps(cls, taps: str | list[str]) -> str | list[str]:
        if isinstance(taps, str) and taps not in PRESETS:
            raise ValueError(f"a preset in {PRESETS} or a list of UNet module paths")
        if isinstance(taps, list) and (not taps or len(set(taps)) != len(taps)):
            raise ValueError("a non-empty list of distinct module paths")
        return taps


@dataclasses.dataclass
class ExtractResult:
    """What one process did: the shards it computed and its compute time."""

    computed_shards: list[int]
    images: int
    seconds: float


def rank_shards(missing: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous slice of the missing shards (disjoint across ranks)."""
    n = len(missing)
    return list(missing[rank * n // world_size : (rank + 1) * n // world_size])


class Extractor:
    """Computes the stored (reduced) features of a batch of images for one timestep."""

    def __init__(
        self, model: DiffusionModel, recipe: FeatureRecipe, prompts: Prompts, draws: int
    ) -> None:
        self.model, self.recipe, self.draws = model, recipe, draws
        self.texts = list(prompts.texts)
        self.embeds = prompts.embeddings  # (P, 77, D)
        self.contexts = {
            k: v.to(model.device, model.dtype)
            for k, v in placeholder_contexts(model, self.texts).items()
        }

    @property
    def n_variants(self) -> int:
        return len(self.texts) * self.draws

    def raw_features(
        self, latents: torch.Tensor, shas: list[str], variant: int, guide: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Unreduced tap maps (B, C, h, w) on the device for one variant (prompt x draw)."""
        p, d = divmod(variant, self.draws)
        prompt = self.texts[p]
        if prompt == GUIDED_PROMPT:
            context = self.contexts[
                ""
            ]  # unlabeled pixels (and DDIM inversion) use the plain prompt
        else:
            context = self.embeds[p : p + 1].to(self.model.device, self.model.dtype)
        lat = latents.to(self.model.device, self.model.dtype)
        return tap_maps(
            self.model, self.recipe, lat, shas, d, prompt, context, self.contexts, guide
        )

    @torch.inference_mode()
    def batch(
        self, latents: torch.Tensor, shas: list[str], guide: torch.Tensor | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """Stored values (B, V, C, h, w) per tap (and int8 scales (B, V, C)), on the host."""
        names = [t.name for t in self.recipe.taps]
        vals: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        scs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        projections = self.recipe.projections
        for v in range(self.n_variants):
            feats = self.raw_features(latents, shas, v, guide)
            for name in names:
                proj = None if projections is None else projections[name]
                # Reduce on the device: only the stored bytes cross to the host.
                x, s = reduce_features(feats[name], self.recipe.storage, proj)
                vals[name].append(x)
                if s is not None:
                    scs[name].append(s)
        out = {k: torch.stack(v, 1).cpu().numpy() for k, v in vals.items()}
        scales = None
        if self.recipe.storage.kind == "int8":
            scales = {k: torch.stack(v, 1).float().cpu().numpy() for k, v in scs.items()}
        return out, scales

    @torch.inference_mode()
    def fit_projections(
        self, latents: np.ndarray, shas: list[str], fit_pixels: int, batch_size: int
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """IncrementalPCA per tap on a pixel sample of the given images (variant 0)."""
        gen = torch.Generator().manual_seed(self.recipe.noise_seed)
        samples: dict[str, list[np.ndarray]] = {t.name: [] for t in self.recipe.taps}
        n = len(shas)
        per_batch = max(1, fit_pixels * batch_size // max(n, 1))
        for b0 in range(0, n, batch_size):
            b1 = min(b0 + batch_size, n)
            feats = self.raw_features(torch.from_numpy(latents[b0:b1]), shas[b0:b1], 0, None)
            for tap in self.recipe.taps:
                samples[tap.name].append(sample_pixels(feats[tap.name], per_batch, gen))
        proj = {
            name: fit_pca(np.concatenate(chunks), self.recipe.storage.k)
            for name, chunks in samples.items()
        }
        self.recipe.projections = {
            k: (torch.from_numpy(c), torch.from_numpy(m)) for k, (c, m) in proj.items()
        }
        return proj


def store_identity(
    model: DiffusionModel,
    taps: list[Tap],
    timestep: int,
    prompts: Prompts,
    index: pd.DataFrame,
    resolution: tuple[int, int],
    cfg: ExtractConfig,
    compute_dtype: str,
) -> StoreIdentity:
    """The identity a store of these settings must carry."""
    inversion = cfg.noise_mode == "ddim_inversion"
    return StoreIdentity(
        model_fingerprint=model.fingerprint,
        taps=tuple(t.name for t in taps),
        tap_modules=tuple(t.module_path for t in taps),
        timestep=int(timestep),
        noise_seed=int(cfg.noise_seed),
        noise_mode=cfg.noise_mode,
        inversion_steps=cfg.inversion_steps if inversion else 0,
        images=index_fingerprint(index["sha256"]),
        resolution=resolution,
        prompts=tuple(prompts.texts),
        draws=int(cfg.draws),
        storage=cfg.storage,
        compute_dtype=compute_dtype,
    )


def check_timestep(model: DiffusionModel, timestep: int, cfg: ExtractConfig) -> None:
    """Refuse, before any work, a timestep the scheduler does not have."""
    n_train = int(model.scheduler.config.num_train_timesteps)
    low = 1 if cfg.noise_mode == "ddim_inversion" else 0
    if not low <= timestep < n_train:
        raise ConfigError(
            f"--timestep {timestep}: must be in {low}..{n_train - 1} for this model's scheduler"
            + (" (ddim_inversion starts at t = 1)" if low else "")
        )


def check_storage(taps: list[Tap], cfg: ExtractConfig) -> None:
    """PCA to k channels needs k below every tap's channel count."""
    mode = parse_storage(cfg.storage)
    small = sorted(
        {f"{t.name} ({t.channels})" for t in taps if mode.kind == "pca" and t.channels <= mode.k}
    )
    if small:
        raise ConfigError(
            f"extract.storage {cfg.storage}: keeps at least as many channels as taps "
            f"{', '.join(small)} have; choose k below the smallest tap width"
        )


def _noop() -> None:
    return None


def extract_store(
    model: DiffusionModel,
    latents: zarr.Array,
    index: pd.DataFrame,
    prompts: Prompts,
    timestep: int,
    out: str | os.PathLike[str],
    cfg: ExtractConfig,
    compute_dtype: str,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = _noop,
    progress: bool = True,
    labels: zarr.Array | None = None,
) -> ExtractResult:
    """Compute the missing shards of store `out` (creating it if absent) that this rank owns."""
    out = Path(out)
    n = int(latents.shape[0])
    if len(index) != n:
        raise StoreError(f"{out}: index has {len(index)} rows but latents hold {n} images")
    check_timestep(model, timestep, cfg)
    stride = model.vae_stride
    resolution = (int(latents.shape[2]) * stride, int(latents.shape[3]) * stride)
    if latents.attrs.get("model_fingerprint", model.fingerprint) != model.fingerprint:
        raise StoreError(
            f"latents were encoded with model {latents.attrs['model_fingerprint']}, "
            f"not {model.fingerprint}; rerun encode"
        )
    taps = resolve_taps(model.unet, cfg.taps, stride)
    check_storage(taps, cfg)
    guided = GUIDED_PROMPT in prompts.texts
    if guided and labels is None:
        raise StoreError(f"{out}: the {GUIDED_PROMPT} variant needs the encoded labels")
    recipe = FeatureRecipe(
        taps, int(timestep), cfg.noise_seed, cfg.noise_mode,
        cfg.inversion_steps if cfg.noise_mode == "ddim_inversion" else 0,
        parse_storage(cfg.storage),
    )  # fmt: skip
    ext = Extractor(model, recipe, prompts, cfg.draws)
    identity = store_identity(model, taps, timestep, prompts, index, resolution, cfg, compute_dtype)
    shas = [str(s) for s in index["sha256"]]
    if rank == 0:
        if out.exists() and not FeatureStore.open(out).done_mask().any():
            # A store with nothing computed yet (a run stopped before its first shard) holds
            # nothing to lose: created again with this run's identity.
            shutil.rmtree(out)
        if out.exists():
            FeatureStore.open(out, identity, mode="r+").remove_partial_files()
        else:
            projections = None
            if recipe.storage.kind == "pca":
                m = min(n, cfg.pca_fit_images)
                projections = ext.fit_projections(
                    np.asarray(latents[:m]), shas[:m], cfg.pca_fit_pixels, cfg.batch_size
                )
            FeatureStore.create(
                out,
                identity,
                n,
                {
                    t.name: (t.channels, resolution[0] // t.stride, resolution[1] // t.stride)
                    for t in taps
                },
                {t.name: t.stride for t in taps},
                cfg.images_per_shard,
                projections,
            )
    barrier()
    store = FeatureStore.open(out, identity, mode="r+")
    # Resumed runs and other ranks use the projection the store holds.
    recipe.projections = store_projections(store)
    missing = store.missing_shards()
    barrier()  # every rank has read the same mask before anyone marks a shard done
    mine = rank_shards(missing, rank, world_size)
    n_mine = sum(store.shard_range(s)[1] - store.shard_range(s)[0] for s in mine)
    start = time.perf_counter()
    bar = tqdm(total=n_mine, desc=f"extract t={timestep}", unit="img", disable=not progress)
    # One writer thread: compression and disk writes of shard i overlap the UNet of shard i+1.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future | None = None
        for shard in mine:
            s0, s1 = store.shard_range(shard)
            lat = np.asarray(latents[s0:s1])
            # DIFF's guide: labels of source train rows; other rows get the plain features.
            lab = guide_labels(labels[s0:s1], list(index["split"].iloc[s0:s1])) if guided else None
            vals: dict[str, list[np.ndarray]] = {t.name: [] for t in taps}
            scs: dict[str, list[np.ndarray]] = {t.name: [] for t in taps}
            # Batches never span shards, so a resumed run sees exactly the batches of a full one.
            for b0 in range(0, s1 - s0, cfg.batch_size):
                b1 = min(b0 + cfg.batch_size, s1 - s0)
                guide = None if lab is None else torch.from_numpy(lab[b0:b1])
                v, s = ext.batch(torch.from_numpy(lat[b0:b1]), shas[s0 + b0 : s0 + b1], guide)
                for k in v:
                    vals[k].append(v[k])
                    if s is not None:
                        scs[k].append(s[k])
                bar.update(b1 - b0)
            feats = {k: np.concatenate(x) for k, x in vals.items()}
            scales = (
                {k: np.concatenate(x) for k, x in scs.items()}
                if recipe.storage.kind == "int8"
                else None
            )
            if pending is not None:
                pending.result()
            pending = pool.submit(store.write_shard, shard, feats, scales)
        if pending is not None:
            pending.result()
    bar.close()
    seconds = time.perf_counter() - start
    barrier()
    return ExtractResult(mine, n_mine, seconds)


def run(
    cfg: ExtractConfig, model_cfg: ModelConfig, timestep: int, encoded_dir: str, model_dir: str,
    out: str,
) -> None:  # fmt: skip
    """The extract@t stage, alone or under torchrun (ranks write disjoint shards of one store)."""
    device = model_cfg.device
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    barrier = _noop
    if world_size > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        barrier = dist.barrier
    prompts = read_prompts(encoded_dir)
    # The text encoder only for placeholder variants; text prompts come encoded.
    placeholders = any(p.startswith("<") for p in prompts.texts)
    parts = ("unet", "text_encoder") if placeholders else ("unet",)
    model = load_diffusion_model(model_dir, model_cfg.dtype, device, parts=parts)
    if prompts.model_fingerprint != model.fingerprint:
        raise StoreError(
            f"{encoded_dir}: prompts were encoded with model {prompts.model_fingerprint}, "
            f"not {model.fingerprint}; rerun encode"
        )
    result = extract_store(
        model, open_latents(encoded_dir), read_index(encoded_dir), prompts, timestep, out, cfg,
        model_cfg.dtype, rank, world_size, barrier, progress=rank == 0,
        labels=open_labels(encoded_dir) if GUIDED_PROMPT in prompts.texts else None,
    )  # fmt: skip
    rate = result.images / result.seconds if result.seconds > 0 else 0.0
    print(
        f"rank {rank}: computed shards {result.computed_shards} "
        f"({result.images} images, {result.seconds:.2f} s, {rate:.1f} img/s) -> {out}",
        flush=True,
    )
    if world_size > 1:
        dist.destroy_process_group()
