"""The extraction loop: UNet taps at one timestep into one FeatureStore per domain, whole
shards, resumable.

x_t is the one-step noised latent (`add`) or the cached inversion's latent at that step
(`trajectory`, from the invert stage). Under torchrun each rank owns a disjoint contiguous range
of the missing shards of a store that rank 0 created at full size before a barrier
(docs/architecture.md, "The feature store").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
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
    domain_index,
    index_fingerprint,
    open_labels,
    open_latents,
    read_index,
    read_prompts,
    source_domain,
)
from pipeline.cache.shards import DiskFullError
from pipeline.cache.storage import fit_pca, parse_storage, reduce_features, sample_pixels
from pipeline.cache.store import FeatureStore, StoreIdentity, writer_lock
from pipeline.core.device import resolve_device
from pipeline.core.errors import ConfigError, StoreError
from pipeline.core.names import GUIDED_DIFF_PROMPT, GUIDED_PROMPT
from pipeline.core.params import STRICT, Positive
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.features import Contexts, guide_labels, prompt_contexts
from pipeline.diffusion.model import DiffusionModel, load_diffusion_model
from pipeline.diffusion.taps import PRESETS, Tap, resolve_taps
from pipeline.loops.features import FeatureRecipe, noised, store_projections, tap_maps
from pipeline.loops.invert import NoiseMode, open_trajectory, trajectory_step


@dataclass(config=STRICT)
class ExtractConfig:
    """The `extract` group (each extract@t stage gets its timestep on the command line)."""

    taps: str | list[str]  # a preset (diff | hyperfeatures | vpd | dift) or UNet module paths
    batch_size: Positive  # performance only (batches never span shards)
    noise_seed: int
    noise_mode: NoiseMode  # add: one-step noise at t; trajectory: DIFF's inversion (invert)
    conditioning: Literal["single", "diff"]  # diff: DIFF's passes (ResNets from the "" pass)
    storage: Annotated[str, Field(pattern=r"^(fp16|int8|pca-[1-9][0-9]*)$")]
    compression: Literal["none", "lz4", "zstd"]  # of each chunk; none measured best
    images_per_shard: Positive
    pca_fit_images: Positive  # PCA fitted on a pixel sample of the source's first images
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
    """What one process did for one store: the shards it computed and its compute time."""

    computed_shards: list[int]
    images: int
    seconds: float


@dataclasses.dataclass
class DomainInputs:
    """One domain's cached inputs: index rows, latents (N, K, C, h, w), and what variants need."""

    index: pd.DataFrame
    latents: zarr.Array
    labels: zarr.Array | None = None  # the guide of the guided variants
    trajectories: dict[str, zarr.Array] | None = None  # "plain" / "guided" (N, K, S, C, h, w)
    step: int | None = None  # the trajectory step whose UNet pass runs at the timestep


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
        self.contexts: Contexts = prompt_contexts(model, self.texts).to(model.device, model.dtype)

    @property
    def n_variants(self) -> int:
        return len(self.texts) * self.draws

    def raw_features(
        self,
        latents_t: dict[str, torch.Tensor],
        variant: int,
        guide: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Unreduced tap maps (B, C, h, w) of one variant (prompt x draw) on the device.

        `latents_t` maps "plain" (and "guided": DIFF's guided trajectory) to x_t (B, K, ...).
        """
        p, d = divmod(variant, self.draws)
        prompt = self.texts[p]
        path = "guided" if prompt == GUIDED_DIFF_PROMPT and "guided" in latents_t else "plain"
        x_t = latents_t[path][:, d].to(self.model.device, self.model.dtype)
        context = None
        if not prompt.startswith("<"):
            context = self.embeds[p : p + 1].to(self.model.device, self.model.dtype)
        return tap_maps(self.model, self.recipe, x_t, prompt, context, self.contexts, guide)

    def latents_t(
        self, inputs: DomainInputs, rows: slice, shas: list[str]
    ) -> dict[str, torch.Tensor]:
        """x_t (B, K, C, h, w) of some rows: noised at t, or read from the trajectories."""
        if inputs.trajectories is not None:
            return {
                k: torch.from_numpy(np.asarray(arr[rows, :, inputs.step]))
                for k, arr in inputs.trajectories.items()
            }
        clean = torch.from_numpy(np.asarray(inputs.latents[rows]))
        dev, dtype = self.model.device, self.model.dtype
        noisy = [
            noised(self.model, self.recipe, clean[:, d].to(dev, dtype), shas, d)
            for d in range(self.draws)
        ]
        return {"plain": torch.stack(noisy, 1)}

    @torch.inference_mode()
    def batch(
        self, latents_t: dict[str, torch.Tensor], guide: torch.Tensor | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """Stored values (B, V, C, h, w) per tap (and int8 scales (B, V, C)), on the host."""
        names = [t.name for t in self.recipe.taps]
        vals: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        scs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        projections = self.recipe.projections
        for v in range(self.n_variants):
            feats = self.raw_features(latents_t, v, guide)
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
        self, inputs: DomainInputs, n: int, fit_pixels: int, batch_size: int
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """IncrementalPCA per tap on a pixel sample of the first `n` images (variant 0)."""
        gen = torch.Generator().manual_seed(self.recipe.noise_seed)
        samples: dict[str, list[np.ndarray]] = {t.name: [] for t in self.recipe.taps}
        per_batch = max(1, fit_pixels * batch_size // max(n, 1))
        shas = [str(s) for s in inputs.index["sha256"]]
        for b0 in range(0, n, batch_size):
            b1 = min(b0 + batch_size, n)
            x_t = self.latents_t(inputs, slice(b0, b1), shas[b0:b1])
            feats = self.raw_features(x_t, 0, None)
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
    inputs: DomainInputs,
    cfg: ExtractConfig,
    compute_dtype: str,
) -> StoreIdentity:
    """The identity a store of these settings must carry."""
    attrs = inputs.latents.attrs
    trajectory = ""
    if inputs.trajectories is not None:
        trajectory = str(inputs.trajectories["plain"].attrs["fingerprint"])
    return StoreIdentity(
        model_fingerprint=model.fingerprint,
        taps=tuple(t.name for t in taps),
        tap_modules=tuple(t.module_path for t in taps),
        timestep=int(timestep),
        noise_seed=int(cfg.noise_seed),
        noise_mode=cfg.noise_mode,
        trajectory=trajectory,
        conditioning=cfg.conditioning,
        encoding=json.dumps(attrs.get("encoding", {}), sort_keys=True),
        images=index_fingerprint(inputs.index["sha256"]),
        resolution=tuple(int(v) for v in attrs["resolution"]),
        prompts=tuple(prompts.texts),
        draws=int(inputs.latents.shape[1]),
        storage=cfg.storage,
        compute_dtype=compute_dtype,
        compression=cfg.compression,
    )


def check_timestep(model: DiffusionModel, timestep: int) -> None:
    """Refuse, before any work, a timestep the scheduler does not have."""
    n_train = int(model.scheduler.config.num_train_timesteps)
    if not 0 <= timestep < n_train:
        raise ConfigError(
            f"--timestep {timestep}: must be in 0..{n_train - 1} for this model's scheduler"
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
    ext: Extractor,
    inputs: DomainInputs,
    prompts: Prompts,
    out: str | os.PathLike[str],
    cfg: ExtractConfig,
    compute_dtype: str,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = _noop,
    progress: bool = True,
    projections: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> ExtractResult:
    """Compute the missing shards of store `out` (creating it if absent) that this rank owns."""
    out = Path(out)
    model, recipe, taps = ext.model, ext.recipe, ext.recipe.taps
    n = int(inputs.latents.shape[0])
    if len(inputs.index) != n:
        raise StoreError(f"{out}: index has {len(inputs.index)} rows but latents hold {n} images")
    if inputs.latents.attrs.get("model_fingerprint") != model.fingerprint:
        raise StoreError(
            f"latents were encoded with model {inputs.latents.attrs.get('model_fingerprint')}, "
            f"not {model.fingerprint}; rerun encode"
        )
    guided = GUIDED_PROMPT in prompts.texts or GUIDED_DIFF_PROMPT in prompts.texts
    if guided and inputs.labels is None:
        raise StoreError(f"{out}: the guided variant needs the encoded labels")
    identity = store_identity(model, taps, recipe.timestep, prompts, inputs, cfg, compute_dtype)
    resolution = identity.resolution
    shas = [str(s) for s in inputs.index["sha256"]]
    if rank == 0:
        shapes = {
            t.name: (t.channels, resolution[0] // t.stride, resolution[1] // t.stride) for t in taps
        }
        strides = {t.name: t.stride for t in taps}
        prepare_store(out, identity, n, shapes, strides, cfg.images_per_shard, projections)
    barrier()
    store = FeatureStore.open(out, identity, mode="r+")
    # Resumed runs and other ranks use the projection the store holds.
    recipe.projections = store_projections(store)
    missing = store.missing_shards()
    barrier()  # every rank has read the same mask before anyone marks a shard done
    mine = rank_shards(missing, rank, world_size)
    n_mine = sum(store.shard_range(s)[1] - store.shard_range(s)[0] for s in mine)
    free = shutil.disk_usage(out).free
    if len(mine) * store.shard_bytes() > free:
        print(
            f"warning: {out}: {len(mine)} shards need about "
            f"{len(mine) * store.shard_bytes() / 1e6:.1f} MB, {free / 1e6:.1f} MB free",
            flush=True,
        )
    start = time.perf_counter()
    bar = tqdm(
        total=n_mine, desc=f"extract {out.parent.name}/{out.name}", unit="img", disable=not progress
    )
    # One writer thread: compression and disk writes of shard i overlap the UNet of shard i+1.
    written = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future | None = None
        for shard in mine:
            s0, s1 = store.shard_range(shard)
            # DIFF's guide: labels of source train rows; other rows get the plain features.
            lab = None
            if guided:
                splits = list(inputs.index["split"].iloc[s0:s1])
                lab = guide_labels(inputs.labels[s0:s1], splits)
            vals: dict[str, list[np.ndarray]] = {t.name: [] for t in taps}
            scs: dict[str, list[np.ndarray]] = {t.name: [] for t in taps}
            # Batches never span shards, so a resumed run sees exactly the batches of a full one.
            for b0 in range(s0, s1, cfg.batch_size):
                b1 = min(b0 + cfg.batch_size, s1)
                guide = None if lab is None else torch.from_numpy(lab[b0 - s0 : b1 - s0])
                x_t = ext.latents_t(inputs, slice(b0, b1), shas[b0:b1])
                v, s = ext.batch(x_t, guide)
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
                written += wait_written(pending, store, mine, written)
            pending = pool.submit(store.write_shard, shard, feats, scales)
        if pending is not None:
            wait_written(pending, store, mine, written)
    bar.close()
    seconds = time.perf_counter() - start
    barrier()
    return ExtractResult(mine, n_mine, seconds)


def prepare_store(
    out: Path,
    identity: StoreIdentity,
    n: int,
    shapes: dict[str, tuple[int, int, int]],
    strides: dict[str, int],
    images_per_shard: int,
    projections: dict[str, tuple[np.ndarray, np.ndarray]] | None,
) -> None:
    """Create the store, or ready an existing one to resume: partial files gone, shards whose
    files were deleted (as `verify` reported them bad) marked for recomputation."""
    if out.exists() and not FeatureStore.open(out).done_mask().any():
        shutil.rmtree(out)  # nothing computed yet: nothing to lose
    if not out.exists():
        FeatureStore.create(out, identity, n, shapes, strides, images_per_shard, projections)
        return
    store = FeatureStore.open(out, identity, mode="r+")
    store.remove_partial_files()
    redo = store.forget_missing()
    if redo:
        print(f"{out}: shards {redo} have missing files; recomputing them", flush=True)


def remove_stale(out: Path, identity: StoreIdentity) -> bool:
    """Delete the store at `out` if it holds other settings (or is no store of this format)."""
    if not out.exists():
        return False
    try:
        if FeatureStore.open(out).identity == identity:
            return False
    except StoreError:
        pass
    shutil.rmtree(out)
    return True


def wait_written(pending: Future, store: FeatureStore, mine: list[int], written: int) -> int:
    """Wait for one shard write (1 when done); a full disk is one error saying what is left."""
    try:
        pending.result()
    except DiskFullError as e:
        left = len(mine) - written
        free = shutil.disk_usage(store.path).free
        raise DiskFullError(
            f"{store.path}: disk full ({e}). {left} shards (about "
            f"{left * store.shard_bytes() / 1e6:.1f} MB) still need writing, "
            f"{free / 1e6:.1f} MB are free; free space and rerun: the {written} shards written "
            "are kept"
        ) from None
    return 1


def domain_inputs(
    encoded_dir: str,
    trajectories_dir: str,
    domain: str,
    prompts: Prompts,
    cfg: ExtractConfig,
    timestep: int,
) -> DomainInputs:
    """What the extraction of one domain reads."""
    inputs = DomainInputs(
        domain_index(read_index(encoded_dir), domain), open_latents(encoded_dir, domain)
    )
    if GUIDED_PROMPT in prompts.texts or GUIDED_DIFF_PROMPT in prompts.texts:
        inputs.labels = open_labels(encoded_dir, domain)
    if cfg.noise_mode == "trajectory":
        inputs.trajectories = {"plain": open_trajectory(trajectories_dir, domain, False)}
        inputs.step = trajectory_step(inputs.trajectories["plain"], timestep)
        guided_path = Path(trajectories_dir) / domain / "guided.zarr"
        if GUIDED_DIFF_PROMPT in prompts.texts and guided_path.exists():
            inputs.trajectories["guided"] = open_trajectory(trajectories_dir, domain, True)
    return inputs


def extract_domains(
    ext: Extractor,
    inputs: dict[str, DomainInputs],
    domains: list[str],
    prompts: Prompts,
    cfg: ExtractConfig,
    compute_dtype: str,
    out: Path,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
) -> dict[str, ExtractResult]:
    """Every domain's store under `out`, the source first (it fits a PCA all domains share)."""
    source = domains[0]
    projections = None
    if ext.recipe.storage.kind == "pca" and rank == 0 and not (out / source).exists():
        m = min(len(inputs[source].index), cfg.pca_fit_images)
        projections = ext.fit_projections(inputs[source], m, cfg.pca_fit_pixels, cfg.batch_size)
    results = {}
    for domain in domains:
        if projections is None and ext.recipe.storage.kind == "pca" and domain != source:
            source_store = FeatureStore.open(out / source)
            projections = {t: source_store.projection(t) for t in source_store.taps}
        result = extract_store(
            ext,
            inputs[domain],
            prompts,
            out / domain,
            cfg,
            compute_dtype,
            rank,
            world_size,
            barrier,
            rank == 0,
            projections,
        )
        results[domain] = result
        rate = result.images / result.seconds if result.seconds > 0 else 0.0
        print(
            f"rank {rank}: {domain}: computed shards {result.computed_shards} "
            f"({result.images} images, {result.seconds:.2f} s, {rate:.1f} img/s)",
            flush=True,
        )
    return results


def run(
    cfg: ExtractConfig,
    model_cfg: ModelConfig,
    timestep: int,
    encoded_dir: str,
    trajectories_dir: str,
    model_dir: str,
    out: str,
    replace_stale: bool = False,
) -> dict[str, ExtractResult]:
    """The extract@t stage, alone or under torchrun: a store per domain under `out`.

    Existing complete shards are kept (resume). `replace_stale` (dvc.yaml's: DVC's cache holds
    the previous version) deletes stores of other settings and of domains no longer listed;
    without it they are an error.
    """
    device = model_cfg.device
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    barrier = _noop
    if world_size > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        barrier = dist.barrier
    else:
        device = resolve_device(device)
    prompts = read_prompts(encoded_dir)
    index = read_index(encoded_dir)
    # The text encoder only for the contexts built here; text prompts come encoded.
    model = load_diffusion_model(model_dir, model_cfg.dtype, device, parts=("unet", "text_encoder"))
    check_timestep(model, timestep)
    if prompts.model_fingerprint != model.fingerprint:
        raise StoreError(
            f"{encoded_dir}: prompts were encoded with model {prompts.model_fingerprint}, "
            f"not {model.fingerprint}; rerun encode"
        )
    taps = resolve_taps(model.unet, cfg.taps, model.vae_stride)
    check_storage(taps, cfg)
    source = source_domain(index)
    # The source first: under PCA its first images fit the projection every domain shares.
    domains = [source] + sorted(set(index["domain"]) - {source})
    inputs = {
        d: domain_inputs(encoded_dir, trajectories_dir, d, prompts, cfg, timestep) for d in domains
    }
    recipe = FeatureRecipe(
        taps,
        int(timestep),
        cfg.noise_seed,
        cfg.noise_mode,
        cfg.conditioning,
        parse_storage(cfg.storage),
    )
    ext = Extractor(model, recipe, prompts, int(inputs[source].latents.shape[1]))
    with writer_lock(out) if rank == 0 else contextlib.nullcontext():
        if rank == 0 and replace_stale:
            for path in sorted(p for p in Path(out).iterdir() if p.is_dir()):
                if path.name not in inputs:
                    shutil.rmtree(path)
                elif not remove_stale(
                    path,
                    store_identity(
                        model, taps, timestep, prompts, inputs[path.name], cfg, model_cfg.dtype
                    ),
                ):
                    continue
                print(f"{path}: removed (other settings; DVC's cache keeps that version)")
        results = extract_domains(
            ext,
            inputs,
            domains,
            prompts,
            cfg,
            model_cfg.dtype,
            Path(out),
            rank,
            world_size,
            barrier,
        )
    if world_size > 1:
        dist.destroy_process_group()
    return results
