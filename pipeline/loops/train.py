"""The train loop: fusion + head from cached features (or pixels, the baseline); no UNet here."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from pipeline.cache.encoded import (
    domain_index,
    domain_rows,
    encoded_resolution,
    open_labels,
    read_index,
    read_prompts,
    source_domain,
)
from pipeline.cache.preload import LoaderConfig, within_budget
from pipeline.cache.reader import FeatureDataset, tap_specs
from pipeline.cache.store import FeatureStore, store_path
from pipeline.cache.variants import VariantViews, resolve_variants
from pipeline.core.classes import IGNORE_INDEX, NUM_CLASSES
from pipeline.core.device import (
    barrier,
    data_loader,
    init_distributed,
    mean_over_ranks,
    peak_rss_mb,
    resolve_device,
    set_threads,
)
from pipeline.core.errors import ConfigError, ModelError
from pipeline.core.fileio import atomic_path, write_csv, write_json
from pipeline.core.names import GUIDED
from pipeline.core.params import STRICT
from pipeline.data.pixels import PIXEL_KEY, PixelDataset
from pipeline.heads.decoders import DAFORMER_DILATIONS, HeadConfig
from pipeline.heads.fusion import FusionConfig
from pipeline.heads.inference import Inference, evaluate_dataset
from pipeline.heads.losses import ViewLoss, segmentation_ce, views_loss
from pipeline.heads.model import SegModel
from pipeline.heads.pixels import pixel_fusion_config
from pipeline.loops.plots import curve_png

OUT_STRIDES = [4, 8, 16, 32]  # the fused maps the head reads (DIFF, DAFormer)
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]


@dataclass(config=STRICT)
class TrainConfig:
    """The `train` group. DIFF: lr 6e-5, head x10, wd 0.01, warm-up 1500, 40k iterations."""

    features: Literal["diffusion", "pixels"]  # pixels: the from-scratch CNN baseline
    # stride: ours, top-down through every stride; diff: DIFF's direct aggregation +
    # finecoder (1/64 dropped); hyperfeatures: Diffusion Hyperfeatures' mixing
    fusion: Literal["stride", "diff", "hyperfeatures"]
    head: Literal["daformer", "mlp"]
    head_norm: Literal["gn", "bn"]
    widths: Annotated[list[Positive], Field(min_length=4, max_length=4)]  # at strides 4/8/16/32
    hyper_channels: Positive
    embed_dim: Positive
    dropout: Annotated[float, Field(ge=0, lt=1)]
    iterations: Positive
    batch_size: Positive
    crop: Annotated[list[Positive], Field(min_length=2, max_length=2)] | None  # [h, w] pixels
    cat_max_ratio: Annotated[float, Field(gt=0, le=1)]  # mmseg RandomCrop: retry crops where
    # one class covers more than this share (10 tries); 1.0: off
    flip: bool
    lr: Annotated[float, Field(gt=0)]
    head_lr_mult: Annotated[float, Field(gt=0)]
    weight_decay: NonNegative
    warmup: Annotated[int, Field(ge=0)]
    warmup_ratio: NonNegative
    poly_power: NonNegative
    rare_class_sampling: bool
    rcs_temperature: Annotated[float, Field(gt=0)]
    rcs_min_pixels: Annotated[int, Field(ge=0)]  # an image counts for class c above this
    rcs_min_crop_ratio: Annotated[float, Field(ge=0)]  # re-crop (10 tries) until the crop
    # holds min_pixels x this of c; 0: no re-crops
    seed: int
    log_interval: Positive
    eval_interval: Annotated[int, Field(ge=0)]  # 0: source-val mIoU at the end only
    checkpoint_interval: Positive
    train_variants: list[str]  # prompt variants to draw from; [] = variant 0 only
    consistency_weight: NonNegative
    consistency: Literal["kl", "mse"]
    pairing: Literal["random", "anchor"]
    guided_weight: NonNegative
    guided_consistency_weight: NonNegative
    device: str  # auto | cpu | cuda
    threads: Annotated[int, Field(ge=0)]  # torch CPU threads; 0 = torch's default
    processes: Positive  # > 1: the stage runs itself under torchrun, one rank per process/GPU

    @field_validator("train_variants")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("a variant is listed more than once")
        return names

    def view_loss(self) -> ViewLoss:
        """The prompt-variant loss terms of this config."""
        return ViewLoss(
            self.consistency_weight,
            self.consistency,
            self.guided_weight,
            self.guided_consistency_weight,
        )


@dataclasses.dataclass
class TrainResult:
    """The trained model and its curves."""

    model: SegModel
    curve: list[dict] = dataclasses.field(default_factory=list)  # {"step", "loss", "lr"}
    val: list[dict] = dataclasses.field(default_factory=list)  # {"step", "mIoU", "aAcc"}
    iterations_done: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    pending: list[float] = dataclasses.field(
        default_factory=list
    )  # losses since the last curve point


def build_model(cfg: TrainConfig, input_specs: dict[str, tuple[int, int]]) -> SegModel:
    """A fresh SegModel for the configured fusion/head on inputs {key: (channels, stride)}."""
    if cfg.features == "pixels":
        fusion = pixel_fusion_config(cfg.widths, OUT_STRIDES)
    else:
        fusion = FusionConfig(
            kind=cfg.fusion,
            inputs={k: [int(c), int(s)] for k, (c, s) in sorted(input_specs.items())},
            out_strides=list(OUT_STRIDES),
            widths=list(cfg.widths),
            channels=cfg.hyper_channels,
        )
    head = HeadConfig(
        kind=cfg.head,
        embed_dim=cfg.embed_dim,
        dilations=list(DAFORMER_DILATIONS),
        dropout=cfg.dropout,
        num_classes=NUM_CLASSES,
        norm=cfg.head_norm,
    )
    return SegModel(fusion, head)


def lr_factor(cfg: TrainConfig, it: int) -> float:
    """Linear warm-up from warmup_ratio, then poly decay to 0 (mmseg's schedule as in DAFormer)."""
    poly = (1.0 - it / max(cfg.iterations, 1)) ** cfg.poly_power
    if it < cfg.warmup:
        k = (1.0 - it / cfg.warmup) * (1.0 - cfg.warmup_ratio)
        return poly * (1.0 - k)
    return poly


def class_pixel_counts(labels: Iterable[np.ndarray | torch.Tensor], n: int) -> np.ndarray:
    """(n, classes) pixel counts of `n` labels, for rare-class sampling."""
    # Into one array: keeping a small torch tensor per image pinned glibc's heap above every
    # freed label buffer, 225 KB per image (+1 GB of peak RSS for 4000 images, benchmarks/
    # streaming.py); this stays flat.
    counts = np.zeros((n, NUM_CLASSES), np.int64)
    for i, lab in enumerate(labels):
        lab = np.asarray(lab).reshape(-1)
        counts[i] = np.bincount(lab[lab != IGNORE_INDEX], minlength=NUM_CLASSES)[:NUM_CLASSES]
    return counts


def rcs_class_probs(counts: np.ndarray, temperature: float) -> np.ndarray:
    """DAFormer's rare-class sampling: P(c) = softmax((1 - f_c) / T) over classes present."""
    freq = counts.sum(axis=0).astype(np.float64)
    present = freq > 0
    f = freq[present] / freq.sum()
    logits = (1.0 - f) / temperature
    p = np.exp(logits - logits.max())
    probs = np.zeros(len(freq))
    probs[present] = p / p.sum()
    return probs


class IterationSampler(Sampler):
    """Batches of (row, y0, x0, flip) that depend only on (seed, iteration): resume is exact.

    The crop rules are mmseg's as DIFF uses them: a random crop on the grid of the largest
    feature stride, retried (10 times) while one class covers more than `cat_max_ratio`
    (mmseg RandomCrop); rare-class sampling picks a class by its rarity, an image holding more
    than `rcs_min_pixels` of it, and re-crops (10 times) until the crop holds
    `rcs_min_pixels * rcs_min_crop_ratio` of it (DIFF: mmseg/datasets/uda_dataset.py:128-144).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        n: int,
        sizes: tuple[int, int],
        max_stride: int,
        start: int,
        stop: int,
        counts: np.ndarray | None = None,
        labels: Callable[[int], np.ndarray] | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.cfg, self.n, self.sizes, self.max_stride = cfg, n, sizes, max_stride
        self.start, self.stop = start, stop
        self.rank, self.world = rank, world
        self.labels = labels
        self.class_probs = None
        if cfg.rare_class_sampling and counts is not None:
            eligible = counts > cfg.rcs_min_pixels
            if not eligible.any():
                raise ConfigError(
                    f"train.rcs_min_pixels {cfg.rcs_min_pixels}: no training image holds more "
                    "pixels than that of any class"
                )
            self.class_probs = rcs_class_probs(counts * eligible, cfg.rcs_temperature)
            self.images_with = [np.flatnonzero(eligible[:, c]) for c in range(counts.shape[1])]

    def __len__(self) -> int:
        return self.stop - self.start

    def _crop(self, rng: np.random.Generator, row: int) -> tuple[int, int]:
        if not self.cfg.crop:
            return 0, 0
        H, W = self.sizes
        ch, cw = self.cfg.crop
        s = self.max_stride
        for _ in range(10 if self.cfg.cat_max_ratio < 1 and self.labels else 1):
            y0 = int(rng.integers((H - ch) // s + 1)) * s
            x0 = int(rng.integers((W - cw) // s + 1)) * s
            if self.cfg.cat_max_ratio >= 1 or self.labels is None:
                break
            _, cnt = _class_counts(self.labels(row)[y0 : y0 + ch, x0 : x0 + cw])
            if len(cnt) > 1 and cnt.max() / cnt.sum() < self.cfg.cat_max_ratio:
                break
        return y0, x0

    def batch(self, it: int) -> list[tuple[int, int, int, bool]]:
        rng = np.random.default_rng([self.cfg.seed, it])
        out = []
        for _ in range(self.cfg.batch_size):
            if self.class_probs is not None:
                c = int(rng.choice(len(self.class_probs), p=self.class_probs))
                row = int(rng.choice(self.images_with[c]))
                y0, x0 = self._crop(rng, row)
                wanted = self.cfg.rcs_min_pixels * self.cfg.rcs_min_crop_ratio
                if self.cfg.crop and wanted > 0 and self.labels is not None:
                    for _ in range(10):
                        ch, cw = self.cfg.crop
                        crop = self.labels(row)[y0 : y0 + ch, x0 : x0 + cw]
                        if (crop == c).sum() > wanted:
                            break
                        y0, x0 = self._crop(rng, row)
            else:
                row = int(rng.integers(self.n))
                y0, x0 = self._crop(rng, row)
            flip = bool(self.cfg.flip and rng.random() < 0.5)
            out.append((row, y0, x0, flip))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int, int, bool]]]:
        for it in range(self.start, self.stop):
            # Seeds torch too: a reader drawing random variants in-process stays reproducible.
            torch.manual_seed(self.cfg.seed * 1_000_003 + it)
            # Under DDP each rank takes its share of the same global batch.
            yield self.batch(it)[self.rank :: self.world]


def _class_counts(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes, cnt = np.unique(label, return_counts=True)
    keep = classes != IGNORE_INDEX
    return classes[keep], cnt[keep]


class _Augmented(Dataset):
    """Crop and flip a reader sample in feature space, given (row, y0, x0, flip)."""

    def __init__(self, base: Dataset, crop: list[int] | None) -> None:
        self.base, self.crop = base, crop

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, spec: tuple[int, int, int, bool]) -> dict:
        row, y0, x0, flip = spec
        sample = self.base[row]
        return augment(sample, self.crop, y0, x0, flip)


def augment(sample: dict, crop: list[int] | None, y0: int, x0: int, flip: bool) -> dict:
    """Crop (image pixels, offsets multiples of every stride) and h-flip features and label."""
    label = sample["label"]
    H, W = label.shape[-2:]
    feats = {}
    for key, x in sample["features"].items():
        s = H // x.shape[-2]
        if crop:
            x = x[..., y0 // s : (y0 + crop[0]) // s, x0 // s : (x0 + crop[1]) // s]
        feats[key] = x.flip(-1) if flip else x
    if crop:
        label = label[..., y0 : y0 + crop[0], x0 : x0 + crop[1]]
    if flip:
        label = label.flip(-1)
    return {"features": feats, "label": label, "index": sample["index"]}


def train(
    cfg: TrainConfig,
    loading: LoaderConfig,
    train_set: Dataset,
    input_specs: dict[str, tuple[int, int]],
    work_dir: str | Path,
    val_set: Dataset | None = None,
    device: str | None = None,
    data_fingerprint: str = "",
    class_counts: np.ndarray | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    crop_labels: Callable[[int], np.ndarray] | None = None,
    rank: int = 0,
    world: int = 1,
) -> TrainResult:
    """Train from `train_set` (reader sample dicts); checkpoints in work_dir/checkpoint, resumed.

    `class_counts` (N, classes) pixel counts per image feed rare-class sampling (else computed);
    `crop_labels(row)` gives a row's label for the crop rules (else read from `train_set`).
    `stop_after` ends the run early (after a checkpoint) as a kill would; a rerun resumes.
    Resume is exact: batches and dropout depend on (seed, iteration) only. Under torchrun
    (`world` ranks, process group started) each rank trains on its share of every global batch
    and gradients are averaged; rank 0 evaluates and checkpoints.
    """
    device = resolve_device(device or cfg.device)
    if cfg.features == "pixels":
        input_specs = {PIXEL_KEY: (3, 1)}
    work_dir = Path(work_dir)
    ckpt_dir = work_dir / "checkpoint"
    identity = {
        "config": {
            k: v
            for k, v in dataclasses.asdict(cfg).items()
            if k not in ("device", "threads", "processes")
        },
        "inputs": [[k, list(v)] for k, v in sorted(input_specs.items())],
        "data": data_fingerprint,
    }

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, input_specs).to(device)
    # Under torchrun: DDP averages gradients, its all-reduce overlapping the backward pass;
    # BatchNorm statistics are synced across GPUs (SyncBatchNorm runs on CUDA only).
    net: torch.nn.Module = model
    if world > 1:
        cuda = torch.device(device).type == "cuda"
        if cuda:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if cuda else None
        )
    head_ids = {id(p) for p in model.head.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in head_ids], "lr_mult": 1.0},
        {"params": list(model.head.parameters()), "lr_mult": cfg.head_lr_mult},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    result = TrainResult(model=model)
    start = 0
    if ckpt_dir.is_dir():
        start = _load_checkpoint(ckpt_dir, identity, model, opt, result)
        result.resumed_from = start

    sample0 = train_set[0]
    sizes = tuple(sample0["label"].shape[-2:])
    max_stride = max(s for _, s in input_specs.values())
    if cfg.batch_size % world:
        raise ConfigError(
            f"train.batch_size {cfg.batch_size}: must be a multiple of the "
            f"{world} processes (each takes an equal share)"
        )
    if cfg.crop and (cfg.crop[0] % max_stride or cfg.crop[1] % max_stride):
        raise ModelError(
            f"train.crop {cfg.crop} must be a multiple of the largest stride {max_stride}"
        )
    counts = class_counts
    if cfg.rare_class_sampling and counts is None:
        counts = class_pixel_counts(
            (train_set[i]["label"] for i in range(len(train_set))), len(train_set)
        )
    stop = cfg.iterations if stop_after is None else min(stop_after, cfg.iterations)
    if crop_labels is None:
        crop_labels = lambda row: train_set[row]["label"].numpy()  # noqa: E731
    sampler = IterationSampler(
        cfg, len(train_set), sizes, max_stride, start, stop, counts, crop_labels, rank, world
    )
    loader = data_loader(
        _Augmented(train_set, cfg.crop),
        device,
        loading.workers,
        loading.prefetch,
        batch_sampler=sampler,
    )
    use_amp = torch.device(device).type == "cuda"
    t0 = time.perf_counter() - result.seconds
    running = result.pending
    model.train()
    bar = tqdm(total=cfg.iterations, initial=start, desc="train", disable=not progress or rank > 0)
    it = start
    for batch in loader:
        # Per-iteration seed: dropout draws depend on (seed, it) only, so resume is exact.
        torch.manual_seed(cfg.seed * 1_000_003 + it + 500_000)
        factor = lr_factor(cfg, it)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * g["lr_mult"] * factor
        feats = {
            k: v.to(device, torch.float32, non_blocking=True) for k, v in batch["features"].items()
        }
        label = batch["label"].to(device, non_blocking=True).long()
        if next(iter(feats.values())).ndim == 5:  # VariantViews: (B, views, C, h, w)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss, _ = views_loss(net, feats, label, cfg.view_loss())
        else:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = net(feats)
            loss = segmentation_ce(logits, label)
        if not torch.isfinite(loss):
            raise ModelError(f"training diverged at iteration {it}: loss {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(mean_over_ranks(loss.item(), world, device))
        it += 1
        bar.update(1)
        if it % cfg.log_interval == 0 or it == cfg.iterations:
            result.curve.append(
                {"step": it, "loss": float(np.mean(running)), "lr": cfg.lr * factor}
            )
            bar.set_postfix(loss=f"{result.curve[-1]['loss']:.3f}")
            running = []
        evaluate_now = cfg.eval_interval and it % cfg.eval_interval == 0
        if val_set is not None and (evaluate_now or it == cfg.iterations) and rank == 0:
            how = Inference("whole", None, None, cfg.batch_size, loading.workers, loading.prefetch)
            s = evaluate_dataset(model, val_set, how, device, progress=False)[0].scores()
            result.val.append({"step": it, "mIoU": s["mIoU"], "aAcc": s["aAcc"]})
            model.train()
        if it % cfg.checkpoint_interval == 0 or it == stop:
            result.iterations_done = it
            result.seconds = time.perf_counter() - t0
            result.pending = running
            if rank == 0:
                _save_checkpoint(ckpt_dir, identity, model, opt, result)
            barrier(world)
    bar.close()
    result.iterations_done = it
    result.seconds = time.perf_counter() - t0
    model.eval()
    return result


def clear_checkpoint(work_dir: str | Path) -> None:
    """Remove work_dir/checkpoint (after the final model is saved)."""
    shutil.rmtree(Path(work_dir) / "checkpoint", ignore_errors=True)


def _save_checkpoint(
    path: Path, identity: dict, model: SegModel, opt: torch.optim.Optimizer, result: TrainResult
) -> None:
    meta = {
        "identity": identity,
        "iteration": result.iterations_done,
        "seconds": result.seconds,
        "curve": result.curve,
        "val": result.val,
        "pending": result.pending,
    }
    with atomic_path(path) as tmp:
        tmp.mkdir()
        model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(model_state, str(tmp / "model.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")  # tensors and numbers only
        (tmp / "state.json").write_text(json.dumps(meta))


def _load_checkpoint(
    path: Path, identity: dict, model: SegModel, opt: torch.optim.Optimizer, result: TrainResult
) -> int:
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return 0  # no usable checkpoint: start over
    if meta.get("identity") != json.loads(json.dumps(identity)):
        shutil.rmtree(path, ignore_errors=True)  # another config or other data: never reuse
        return 0
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    opt.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    result.curve = meta["curve"]
    result.val = meta["val"]
    result.pending = meta["pending"]
    result.seconds = float(meta["seconds"])
    return int(meta["iteration"])


def diff_inputs(cfg: TrainConfig, specs: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The features the head reads: DIFF's finecoder discards stride 64 (finecoder.py:173-180)."""
    if cfg.fusion != "diff":
        return specs
    return {k: v for k, v in specs.items() if v[1] <= max(OUT_STRIDES)}


def source_datasets(
    cfg: TrainConfig,
    encoded_dir: str | Path,
    features_dir: str | Path,
    timesteps: list[int],
    threads: int = 1,
) -> tuple[Dataset, Dataset, dict[str, tuple[int, int]], str]:
    """(train, val) readers of the source domain, their feature specs, and a data fingerprint."""
    index = read_index(encoded_dir)
    source = source_domain(index)
    train_rows = domain_rows(index, source, "train")
    val_rows = domain_rows(index, source, "val")
    if cfg.features == "pixels":
        rows = domain_index(index, source)
        canvas = encoded_resolution(encoded_dir, source)
        datasets = PixelDataset(rows, train_rows, canvas), PixelDataset(rows, val_rows, canvas)
        what = [list(rows["sha256"]), canvas]
        return *datasets, {}, hashlib.sha256(json.dumps(what).encode()).hexdigest()
    paths = [store_path(features_dir, t, source) for t in timesteps]
    specs = diff_inputs(cfg, tap_specs(paths))
    reader = dict(encoded_dir=encoded_dir, domain=source, keys=list(specs), threads=threads)
    train_set = FeatureDataset(paths, train_rows, **reader)
    val_set = FeatureDataset(paths, val_rows, **reader)
    identities = [FeatureStore.open(p).identity for p in paths]
    draws = identities[0].draws
    if cfg.train_variants or cfg.consistency_weight > 0 or cfg.guided_weight > 0 or draws > 1:
        names = read_prompts(encoded_dir).names
        # Every draw of each train variant: what DIFF draws afresh each iteration, drawn here.
        variants = resolve_variants(cfg.train_variants or names[:1], names, draws)
        guided = None
        if cfg.guided_weight > 0:
            guided = resolve_variants([GUIDED], names, 1)[0] * draws
        pairing = cfg.pairing if cfg.consistency_weight > 0 else None
        train_set = VariantViews(train_set, variants, pairing, guided)
    # What the inputs' values depend on: a checkpoint of other data is never resumed.
    what = [[i.to_attrs() for i in identities], train_rows]
    fingerprint = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    return train_set, val_set, specs, fingerprint


def run(
    cfg: TrainConfig,
    loading: LoaderConfig,
    timesteps: list[int],
    encoded_dir: str,
    features_dir: str,
    out: str,
    work: str,
    metrics_path: str,
    plots_dir: str,
) -> None:
    """The train stage: source readers (in memory or streamed: cache/preload.py), train, write
    outputs. Under torchrun every rank trains; rank 0 evaluates and writes."""
    set_threads(cfg.threads)
    rank, world, device = init_distributed(resolve_device(cfg.device))
    train_set, val_set, specs, fingerprint = source_datasets(
        cfg, encoded_dir, features_dir, timesteps, loading.read_threads
    )
    train_set = within_budget(train_set, loading, f"train split (rank {rank})")
    val_set = within_budget(val_set, loading, "val split") if rank == 0 else None
    index = read_index(encoded_dir)
    source = source_domain(index)
    labels = open_labels(encoded_dir, source)
    rows = domain_rows(index, source, "train")
    counts = None
    if cfg.rare_class_sampling:
        counts = class_pixel_counts((labels[i] for i in rows), len(rows))
    result = train(
        cfg,
        loading,
        train_set,
        specs,
        work,
        val_set,
        device,
        fingerprint,
        class_counts=counts,
        crop_labels=lambda i: np.asarray(labels[rows[i]]),
        rank=rank,
        world=world,
    )
    if world > 1:
        dist.destroy_process_group()
    if rank > 0:
        return
    result.model.save_pretrained(out)
    write_csv(result.curve, f"{plots_dir}/curve.csv", ["step", "loss", "lr"])
    write_csv(result.val, f"{plots_dir}/val.csv", ["step", "mIoU", "aAcc"])
    curve_png(result.curve, result.val, f"{plots_dir}/curve.png")
    final_val = result.val[-1] if result.val else {}
    write_json(
        metrics_path,
        {
            "features": cfg.features,
            "iterations": result.iterations_done,
            "final_loss": result.curve[-1]["loss"] if result.curve else None,
            "source_val": {"mIoU": final_val.get("mIoU"), "aAcc": final_val.get("aAcc")},
            "seconds": round(result.seconds, 1),
            "seconds_per_iteration": round(result.seconds / max(result.iterations_done, 1), 4),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "device": device,
            "processes": world,
        },
    )
    clear_checkpoint(work)
