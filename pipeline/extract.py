"""The extraction loop: UNet taps of noised latents into a FeatureStore, whole shards, resumable.

Under torchrun each rank owns a disjoint contiguous range of the missing shards of one store
that rank 0 created at full size before a barrier (DESIGN.md §5).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr
from tqdm import tqdm

from pipeline.diffusion import DiffusionModel
from pipeline.errors import StoreError
from pipeline.noising import noise_latents
from pipeline.prompts import GUIDED_PROMPT, guide_labels, special_contexts, variant_unet_features
from pipeline.reduce import fit_pca, parse_storage, reduce_features, sample_pixels
from pipeline.store import FeatureStore, StoreIdentity, index_fingerprint
from pipeline.taps import Tap, resolve_taps


@dataclasses.dataclass
class ExtractConfig:
    """params.yaml `extract` group, less `timesteps` (each stage gets its own via --timestep)."""

    taps: str | list[str] = "diff"
    batch_size: int = 16
    noise_seed: int = 0
    noise_mode: str = "add"  # add | ddim_inversion
    inversion_steps: int = 5
    draws: int = 1
    storage: str = "fp16"  # fp16 | int8 | pca-<k>
    images_per_shard: int = 16
    pca_fit_images: int = 16
    pca_fit_pixels: int = 20000


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
        self,
        model: DiffusionModel,
        taps: list[Tap],
        timestep: int,
        prompt_embeds: torch.Tensor,
        cfg: ExtractConfig,
        prompts: Sequence[str] | None = None,
    ) -> None:
        self.model = model
        self.taps = taps
        self.t = int(timestep)
        self.prompt_embeds = prompt_embeds  # (P, 77, D)
        self.cfg = cfg
        self.mode = parse_storage(cfg.storage)
        self.projections: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        # Placeholder prompts ("<guided>", "<category>") are conditioned by pipeline.prompts.
        self.prompts = list(prompts) if prompts is not None else [""] * prompt_embeds.shape[0]
        self.contexts = {
            k: v.to(model.device, model.dtype)
            for k, v in special_contexts(model, self.prompts).items()
        }

    @property
    def n_variants(self) -> int:
        return self.prompt_embeds.shape[0] * self.cfg.draws

    @torch.inference_mode()
    def raw_features(
        self,
        latents: torch.Tensor,
        shas: list[str],
        variant: int,
        guide: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Unreduced tap maps (B, C, h, w) on the device for one variant (prompt x draw)."""
        p, d = divmod(variant, self.cfg.draws)
        dev = self.model.device
        lat = latents.to(dev, self.model.dtype)
        emb = self.prompt_embeds[p : p + 1].to(dev, self.model.dtype)
        prompt = self.prompts[p]
        if prompt == GUIDED_PROMPT:
            emb = self.contexts[""]  # unlabeled pixels (and DDIM inversion) use the plain prompt
        noisy = noise_latents(
            self.model,
            lat,
            self.t,
            shas,
            self.cfg.noise_seed,
            d,
            self.cfg.noise_mode,
            prompt_embeds=emb,
            inversion_steps=self.cfg.inversion_steps,
        )
        return variant_unet_features(
            self.model, noisy, self.t, prompt, emb, self.taps, guide, self.contexts
        )

    @torch.inference_mode()
    def batch(
        self, latents: torch.Tensor, shas: list[str], guide: torch.Tensor | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """Stored values (B, V, C, h, w) per tap (and int8 scales (B, V, C)), on the host."""
        vals: dict[str, list[torch.Tensor]] = {t.name: [] for t in self.taps}
        scs: dict[str, list[torch.Tensor]] = {t.name: [] for t in self.taps}
        for v in range(self.n_variants):
            feats = self.raw_features(latents, shas, v, guide)
            for tap in self.taps:
                proj = None if self.projections is None else self.projections[tap.name]
                # Reduce on the device: only the stored bytes cross to the host.
                x, s = reduce_features(feats[tap.name], self.mode, proj)
                vals[tap.name].append(x)
                if s is not None:
                    scs[tap.name].append(s)
        out = {k: torch.stack(v, 1).cpu().numpy() for k, v in vals.items()}
        scales = None
        if self.mode.kind == "int8":
            scales = {k: torch.stack(v, 1).float().cpu().numpy() for k, v in scs.items()}
        return out, scales

    def fit_projections(
        self, latents: np.ndarray, shas: list[str]
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """IncrementalPCA per tap on a pixel sample of the given images (variant 0)."""
        gen = torch.Generator().manual_seed(self.cfg.noise_seed)
        samples: dict[str, list[np.ndarray]] = {t.name: [] for t in self.taps}
        n = len(shas)
        per_batch = max(1, self.cfg.pca_fit_pixels * self.cfg.batch_size // max(n, 1))
        for b0 in range(0, n, self.cfg.batch_size):
            b1 = min(b0 + self.cfg.batch_size, n)
            feats = self.raw_features(torch.from_numpy(latents[b0:b1]), shas[b0:b1], 0)
            for tap in self.taps:
                samples[tap.name].append(sample_pixels(feats[tap.name], per_batch, gen))
        proj = {
            name: fit_pca(np.concatenate(chunks), self.mode.k) for name, chunks in samples.items()
        }
        self.projections = {
            k: (torch.from_numpy(c), torch.from_numpy(m)) for k, (c, m) in proj.items()
        }
        return proj

    def use_store_projections(self, store: FeatureStore) -> None:
        """Take the PCA projection from an existing store (resume, other ranks)."""
        if self.mode.kind == "pca":
            self.projections = {}
            for tap in self.taps:
                comp, mean = store.projection(tap.name)  # type: ignore[misc]
                self.projections[tap.name] = (torch.from_numpy(comp), torch.from_numpy(mean))


def store_identity(
    model: DiffusionModel,
    taps: list[Tap],
    timestep: int,
    prompts: list[str],
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
        images=index_fingerprint(index["sha256"]),
        resolution=resolution,
        noise_mode=f"ddim_inversion-{cfg.inversion_steps}" if inversion else cfg.noise_mode,
        prompts=tuple(prompts),
        draws=int(cfg.draws),
        storage=cfg.storage,
        compute_dtype=compute_dtype,
    )


def _noop() -> None:
    return None


def extract_store(
    model: DiffusionModel,
    latents: zarr.Array,
    index: pd.DataFrame,
    prompts: list[str],
    prompt_embeds: torch.Tensor,
    timestep: int,
    out: str | os.PathLike[str],
    cfg: ExtractConfig,
    compute_dtype: str = "fp32",
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
    stride = model.vae_stride
    resolution = (int(latents.shape[2]) * stride, int(latents.shape[3]) * stride)
    if latents.attrs.get("model_fingerprint", model.fingerprint) != model.fingerprint:
        raise StoreError(
            f"latents were encoded with model {latents.attrs['model_fingerprint']}, "
            f"not {model.fingerprint}; rerun encode"
        )
    taps = resolve_taps(model.unet, cfg.taps, stride)
    ext = Extractor(model, taps, timestep, prompt_embeds, cfg, prompts)
    guided = GUIDED_PROMPT in prompts
    if guided and labels is None:
        raise StoreError(f"{out}: the {GUIDED_PROMPT} variant needs the encoded labels")
    identity = store_identity(model, taps, timestep, prompts, index, resolution, cfg, compute_dtype)
    shas = [str(s) for s in index["sha256"]]
    if rank == 0:
        if out.exists():
            FeatureStore.open(out, identity, mode="r+").remove_partial_files()
        else:
            projections = None
            if ext.mode.kind == "pca":
                m = min(n, cfg.pca_fit_images)
                projections = ext.fit_projections(np.asarray(latents[:m]), shas[:m])
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
    ext.use_store_projections(store)
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
                {k: np.concatenate(x) for k, x in scs.items()} if ext.mode.kind == "int8" else None
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
