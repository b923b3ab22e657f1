"""The extraction loop: UNet taps at one timestep into one FeatureStore per encoded set, whole
shards, resumable.

x_t is the one-step noised latent (`add`) or the cached inversion's latent at that step
(`trajectory`, from the invert stage). Under torchrun (one node or several) each rank owns a
disjoint range of the missing shards of a store that rank 0 created at full size before a
barrier; the tasks of a Slurm job array own fixed shares of stores a `create_only` run made
before them (docs/scale.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import PositiveFloat, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass
from tqdm import tqdm

from pipeline.cache.encoded import (
    GUIDED_LATENTS_NAME,
    Prompts,
    index_fingerprint,
    open_labels,
    open_latents,
    read_index,
    read_prompts,
    read_whole,
    set_dir,
    set_index,
    set_names,
)
from pipeline.cache.shards import DiskFullError
from pipeline.cache.storage import parse_storage
from pipeline.cache.store import (
    FeatureStore,
    StoreIdentity,
    StoreLayout,
    store_written_here,
    writer_lock,
)
from pipeline.cache.trajectories import (
    open_trajectory,
    trajectory_path,
    trajectory_step,
)
from pipeline.core.device import ALONE, Workers
from pipeline.core.errors import ConfigError, IdentityError, PipelineError, StoreError
from pipeline.core.fileio import remove_written, write_json, write_timing
from pipeline.core.names import GUIDED_DIFF_PROMPT, GUIDED_PROMPT
from pipeline.core.params import STRICT, Positive
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.model import DiffusionModel, load_diffusion_model
from pipeline.diffusion.taps import PRESETS, Tap, resolve_taps
from pipeline.diffusion.unet_features import guide_labels
from pipeline.extraction.extractor import Extractor, SetInputs
from pipeline.extraction.noise import noise_mode
from pipeline.extraction.recipe import FeatureRecipe, store_projections


@dataclass(config=STRICT)
class ExtractConfig:
    """The `extract` group (each extract@t stage gets its timestep on the command line)."""

    taps: str | list[str]  # a preset of diffusion/taps.py PRESETS or UNet module paths
    batch_size: Positive  # performance only (batches never span shards)
    noise_seed: int
    noise_mode: str  # a mode of extraction/noise.py NOISE_MODES
    conditioning: Literal["single", "diff"]  # diff: DIFF's passes (ResNets from the "" pass)
    storage: str  # a mode of cache/storage.py MODES
    compression: Literal["none", "lz4", "zstd"]  # of each chunk; none measured best
    shard_mb: PositiveFloat  # bytes of one shard (every array of a store): sets its images
    pca_fit_images: Positive  # PCA fitted on a pixel sample of the source's first images
    pca_fit_pixels: Positive

    @field_validator("taps")
    @classmethod
    def _taps(cls, taps: str | list[str]) -> str | list[str]:
        if isinstance(taps, str) and taps not in PRESETS:
            raise ValueError(f"a preset in {list(PRESETS)} or a list of UNet module paths")
        if isinstance(taps, list) and (not taps or len(set(taps)) != len(taps)):
            raise ValueError("a non-empty list of distinct module paths")
        return taps

    @field_validator("storage", "noise_mode")
    @classmethod
    def _in_its_table(cls, name: str, info: ValidationInfo) -> str:
        parse = {"storage": parse_storage, "noise_mode": noise_mode}[info.field_name]
        try:
            parse(name)
        except PipelineError as e:
            raise ValueError(str(e)) from None
        return name


@dataclasses.dataclass
class ExtractResult:
    """What one process did for one store: the shards it computed and its compute time."""

    computed_shards: list[int]
    images: int
    seconds: float


def store_identity(
    model: DiffusionModel,
    taps: list[Tap],
    timestep: int,
    prompts: Prompts,
    inputs: SetInputs,
    cfg: ExtractConfig,
    compute_dtype: str,
) -> StoreIdentity:
    """The identity a store of these settings must carry."""
    attrs = inputs.latents.attrs
    trajectory = ""
    if inputs.trajectories is not None:
        trajectory = str(inputs.trajectories["plain"].attrs["fingerprint"])
    return StoreIdentity(
        model_fingerprint=model.unet_fingerprint,
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
            f"timesteps: {timestep} is outside 0..{n_train - 1}, the range of this model's "
            "scheduler"
        )


def extract_store(
    ext: Extractor,
    inputs: SetInputs,
    prompts: Prompts,
    out: str | os.PathLike[str],
    cfg: ExtractConfig,
    compute_dtype: str,
    workers: Workers = ALONE,
    progress: bool = True,
    projections: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    create_only: bool = False,
) -> ExtractResult:
    """Compute the missing shards of store `out` that this writer owns. The store is created
    (or readied to resume) by rank 0 of a process group or by a `create_only` run; the tasks of
    an array find it made."""
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
    if create_only or (workers.synced and workers.rank == 0):
        shapes = {
            t.name: (t.channels, resolution[0] // t.stride, resolution[1] // t.stride) for t in taps
        }
        strides = {t.name: t.stride for t in taps}
        layout = StoreLayout.sized(
            n, identity.n_variants, shapes, strides, cfg.storage, cfg.shard_mb, cfg.batch_size
        )
        prepare_store(out, identity, n, shapes, strides, layout.images_per_shard, projections)
    elif not workers.synced and not (out / "zarr.json").is_file():
        raise StoreError(
            f"{out}: no store for the array's tasks to fill; create it first with one run of the "
            "stage with --create-only (docs/scale.md)"
        )
    workers.barrier()
    store = FeatureStore.open(out, identity, mode="r+")
    # Resumed runs and other writers use the projection the store holds.
    recipe.projections = store_projections(store)
    missing = store.missing_shards()
    workers.barrier()  # every rank has read the same mask before anyone marks a shard done
    mine = [] if create_only else workers.share(missing)
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
            # DIFF's guide: labels of source train rows (of each crop draw: the crop's classes);
            # other rows get the plain features.
            lab = None
            if guided:
                splits = list(inputs.index["split"].iloc[s0:s1])
                lab = guide_labels(read_whole(inputs.labels, slice(s0, s1)), splits)
            batches: dict[str, dict[str, list[np.ndarray]]] = {}  # array -> tap -> batches
            # Batches never span shards, so a resumed run sees exactly the batches of a full one.
            for b0 in range(s0, s1, cfg.batch_size):
                b1 = min(b0 + cfg.batch_size, s1)
                guide = None if lab is None else torch.from_numpy(lab[b0 - s0 : b1 - s0])
                x_t = ext.latents_t(inputs, slice(b0, b1), shas[b0:b1])
                for part, by_tap in ext.batch(x_t, guide).items():
                    for k, x in by_tap.items():
                        batches.setdefault(part, {}).setdefault(k, []).append(x)
                bar.update(b1 - b0)
            stored = {p: {k: np.concatenate(x) for k, x in t.items()} for p, t in batches.items()}
            if pending is not None:
                written += wait_written(pending, store, mine, written)
            values = stored.pop("values")
            pending = pool.submit(store.write_shard, shard, values, **stored)
        if pending is not None:
            wait_written(pending, store, mine, written)
    bar.close()
    seconds = time.perf_counter() - start
    workers.barrier()
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
    """Create the store, or ready an existing one to resume: partial files gone, every kept
    shard checked (index and chunk checksums) and the bad or missing ones marked for
    recomputation, so a store is never reported complete with a shard a reader would reject.
    A store whose metadata is damaged (zarr.json, the done mask) is recreated."""
    if out.exists():
        try:
            store = FeatureStore.open(out, identity, mode="r+")
            damaged = store.check_metadata()
            if damaged:
                raise StoreError("; ".join(f"{f}: {p}" for f, p in damaged))
        except IdentityError:
            raise
        except StoreError as e:
            print(f"{out}: damaged metadata ({e}); recreating the store", flush=True)
            remove_written(out, store_written_here(out))
    if out.exists() and not store.done_mask().any():
        remove_written(out, store_written_here(out))  # nothing computed yet: nothing to lose
    if not out.exists():
        FeatureStore.create(out, identity, n, shapes, strides, images_per_shard, projections)
        return
    store.remove_partial_files()
    bad = store.repair()
    if bad:
        print(f"{out}: shards {bad} fail their checks; recomputing them", flush=True)
    redo = store.forget_missing()
    if redo:
        print(f"{out}: shards {redo} have missing files; recomputing them", flush=True)


def remove_stale(out: Path, identity: StoreIdentity) -> bool:
    """Delete the store at `out` if it holds other settings or is damaged; a folder this
    pipeline did not write is refused (OutputError), never deleted."""
    if not out.exists():
        return False
    try:
        if FeatureStore.open(out).identity == identity:
            return False
    except StoreError:
        pass
    remove_written(out, store_written_here(out))
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


def set_inputs(
    encoded_dir: str,
    trajectories_dir: str,
    name: str,
    prompts: Prompts,
    cfg: ExtractConfig,
    timestep: int,
) -> SetInputs:
    """What the extraction of one encoded set reads."""
    inputs = SetInputs(set_index(read_index(encoded_dir), name), open_latents(encoded_dir, name))
    if GUIDED_PROMPT in prompts.texts or GUIDED_DIFF_PROMPT in prompts.texts:
        inputs.labels = open_labels(encoded_dir, name)
        if (set_dir(encoded_dir, name) / GUIDED_LATENTS_NAME).exists():
            inputs.guided_latents = open_latents(encoded_dir, name, guided=True)
    if noise_mode(cfg.noise_mode).inverts:
        inputs.trajectories = {"plain": open_trajectory(trajectories_dir, name, False)}
        inputs.step = trajectory_step(inputs.trajectories["plain"], timestep)
        guided = trajectory_path(trajectories_dir, name, True)
        if GUIDED_DIFF_PROMPT in prompts.texts and guided.exists():
            inputs.trajectories["guided"] = open_trajectory(trajectories_dir, name, True)
    return inputs


def extract_sets(
    ext: Extractor,
    inputs: dict[str, SetInputs],
    prompts: Prompts,
    cfg: ExtractConfig,
    compute_dtype: str,
    out: Path,
    workers: Workers,
    create_only: bool = False,
) -> dict[str, ExtractResult]:
    """Every set's store under `out`, in `inputs`' order: the source's first (its first images
    fit the PCA every set shares)."""
    first = next(iter(inputs))
    creates = create_only or (workers.synced and workers.rank == 0)
    projections = None
    if creates and not (out / first).exists():  # what the mode fits (PCA), on the source
        m = min(len(inputs[first].index), cfg.pca_fit_images)
        projections = ext.fit_projections(inputs[first], m, cfg.pca_fit_pixels, cfg.batch_size)
    results = {}
    for name, one in inputs.items():
        if projections is None and name != first:  # the source's, as its store holds it
            projections = FeatureStore.open(out / first).projections()
        result = extract_store(
            ext,
            one,
            prompts,
            out / name,
            cfg,
            compute_dtype,
            workers,
            workers.rank == 0,
            projections,
            create_only,
        )
        results[name] = result
        rate = result.images / result.seconds if result.seconds > 0 else 0.0
        print(
            f"rank {workers.rank}: {name}: computed shards {result.computed_shards} "
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
    metrics_path: str | None = None,
    replace_stale: bool = False,
    create_only: bool = False,
    digest: str | None = None,
) -> dict[str, ExtractResult]:
    """The extract@t stage, alone, under torchrun or as a Slurm array task: a store per
    encoded set under `out`.

    Existing complete shards are kept (resume). `replace_stale` (dvc.yaml's: DVC's cache holds
    the previous version) deletes stores of other settings and of sets no longer encoded;
    without it they are an error. `create_only` creates (or readies) every store and computes
    nothing: what an array's tasks need before they start. The process that creates the
    stores, when it computed too, writes the stage's seconds and megabytes to `metrics_path`
    and the stores' content digests to `digest` (what later stages depend on).
    """
    start = time.perf_counter()
    workers, device = Workers.start(model_cfg.device, "model.device")
    creates = create_only or (workers.synced and workers.rank == 0)
    prompts = read_prompts(encoded_dir)
    index = read_index(encoded_dir)
    # The text encoder only for the contexts built here; text prompts come encoded.
    model = load_diffusion_model(
        model_dir, model_cfg.dtype, device, ("unet", "text_encoder"), model_cfg.unet
    )
    check_timestep(model, timestep)
    if prompts.model_fingerprint != model.fingerprint:
        raise StoreError(
            f"{encoded_dir}: prompts were encoded with model {prompts.model_fingerprint}, "
            f"not {model.fingerprint}; rerun encode"
        )
    taps = resolve_taps(model.unet, cfg.taps, model.vae_stride)
    parse_storage(cfg.storage).check_widths({t.name: t.channels for t in taps})
    inputs = {
        name: set_inputs(encoded_dir, trajectories_dir, name, prompts, cfg, timestep)
        for name in set_names(index)
    }
    recipe = FeatureRecipe(
        taps,
        int(timestep),
        cfg.noise_seed,
        noise_mode(cfg.noise_mode),
        cfg.conditioning,
        parse_storage(cfg.storage),
    )
    ext = Extractor(model, recipe, prompts)
    # The process that creates holds the lock alone; the tasks of an array share it (so a
    # second extract, alone or another array's creation, stops with one line).
    lock = writer_lock(out, shared=not creates) if creates or not workers.synced else None
    with lock or contextlib.nullcontext():
        if creates and replace_stale:
            for path in sorted(p for p in Path(out).iterdir() if p.is_dir()):
                if path.name not in inputs:
                    remove_written(path, store_written_here(path))
                elif not remove_stale(
                    path,
                    store_identity(
                        model, taps, timestep, prompts, inputs[path.name], cfg, model_cfg.dtype
                    ),
                ):
                    continue
                print(f"{path}: removed (other settings; DVC's cache keeps that version)")
        results = extract_sets(
            ext, inputs, prompts, cfg, model_cfg.dtype, Path(out), workers, create_only
        )
    workers.close()
    if creates and not create_only:
        if digest is not None:
            stores = {name: FeatureStore.open(Path(out) / name) for name in inputs}
            write_json(digest, {name: s.content_digest() for name, s in stores.items()})
        if metrics_path is not None:
            write_timing(metrics_path, time.perf_counter() - start, out)
    return results
