"""The train loop: fusion + head from cached features (or pixels, the baseline); no UNet here.

Each iteration's samples depend only on (seed, iteration): which image (rare-class sampling as
DAFormer's), which draw, which prompt variants as its views, and, for whole frames, a
feature-space crop and flip. Crop draws (encode.crop) were cut before the UNet ran, as DIFF
cuts them, and are read whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler
from tqdm import tqdm

from dvclive import Live
from pipeline.cache.encoded import (
    class_pixels,
    encoded_resolution,
    open_draw_pixels,
    read_index,
    read_prompts,
    set_index,
    source_domain,
    split_rows,
)
from pipeline.cache.preload import LoaderConfig, within_budget
from pipeline.cache.reader import FeatureReader, tap_specs
from pipeline.cache.store import FeatureStore, store_path
from pipeline.cache.variants import Views, prompt_indices
from pipeline.core.classes import NUM_CLASSES
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
from pipeline.core.fileio import atomic_path, remove_written, write_json
from pipeline.core.names import GUIDED
from pipeline.core.params import STRICT
from pipeline.data.pixel_reader import PIXEL_KEY, PixelReader
from pipeline.data.samples import (
    Pick,
    Reader,
    RowsDataset,
    Sample,
    ViewsDataset,
    collate,
    to_device,
)
from pipeline.data.sampling import RcsTable, SamplingConfig, pick_draw, rcs_crop
from pipeline.heads.decoders import DAFORMER_DILATIONS, HeadConfig, HeadKind
from pipeline.heads.fusion import FusionConfig, FusionKind
from pipeline.heads.inference import Inference, evaluate_dataset
from pipeline.heads.losses import ViewLoss, views_loss
from pipeline.heads.pixel_cnn import pixel_fusion_config
from pipeline.heads.seg_model import SegModel
from pipeline.reporting.live import open_live
from pipeline.reporting.plots import curve_png

OUT_STRIDES = [4, 8, 16, 32]  # the fused maps the head reads (DIFF, DAFormer)
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]


@dataclass(config=STRICT)
class TrainConfig:
    """The `train` group. DIFF: lr 6e-5, head x10, wd 0.01, warm-up 1500, 40k iterations."""

    features: Literal["diffusion", "pixels"]  # pixels: the from-scratch CNN baseline
    fusion: FusionKind  # heads/fusion.py FUSIONS
    head: HeadKind  # heads/decoders.py HEADS
    head_norm: Literal["gn", "bn"]
    widths: Annotated[list[Positive], Field(min_length=4, max_length=4)]  # at strides 4/8/16/32
    hyper_channels: Positive
    embed_dim: Positive
    dropout: Annotated[float, Field(ge=0, lt=1)]
    iterations: Positive
    batch_size: Positive
    lr: Annotated[float, Field(gt=0)]
    head_lr_mult: Annotated[float, Field(gt=0)]
    weight_decay: NonNegative
    warmup: Annotated[int, Field(ge=0)]
    warmup_ratio: NonNegative
    poly_power: NonNegative
    grad_clip: Annotated[float, Field(gt=0)] | None  # max gradient norm (DIFF: 5); null: off
    ce_average: Literal["all", "valid"]  # all: mmseg's mean over every pixel (DIFF); valid:
    # over labeled pixels only
    precision: Literal["fp32", "bf16"]  # fusion + head (DIFF: fp32); bf16: autocast
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

    @model_validator(mode="after")
    def _processes(self) -> TrainConfig:
        if self.batch_size % self.processes:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of processes "
                f"{self.processes} (each process takes an equal share of every batch)"
            )
        return self

    def view_loss(self) -> ViewLoss:
        """The prompt-variant loss terms of this config."""
        return ViewLoss(
            self.consistency_weight,
            self.consistency,
            self.guided_weight,
            self.guided_consistency_weight,
            self.ce_average,
        )


@dataclasses.dataclass
class TrainData:
    """What training reads: the source training set's reader and rows, and what sampling needs."""

    reader: Reader
    rows: list[int]  # the training rows of the reader's set
    specs: dict[str, tuple[int, int]]  # {key: (channels, stride)} of the features read
    views: Views
    class_pixels: np.ndarray  # (rows, classes): pixel counts of their original labels (RCS)
    draw_pixels: np.ndarray | None  # (set rows, K, classes) of crop draws; None: whole frames
    fingerprint: str  # what the inputs' values depend on (a checkpoint of other data is dropped)
    val: RowsDataset | None = None  # the source's val split, scored during training


@dataclasses.dataclass
class TrainResult:
    """The trained model and its curves."""

    model: SegModel
    curve: list[dict] = dataclasses.field(default_factory=list)  # {"step", "loss", "lr"}
    val: list[dict] = dataclasses.field(default_factory=list)  # {"step", "mIoU", "aAcc"}
    iterations_done: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    pending: list[float] = dataclasses.field(default_factory=list)  # losses since the last point


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


class IterationSampler(Sampler):
    """Batches of Picks that depend only on (seed, iteration): resume is exact.

    Rare-class sampling picks a class by its rarity and an image holding more than
    `rcs_min_pixels` of it (DAFormer, uda_dataset.py:128-144); a crop draw is then one of the
    image's draws holding enough of the class (what DAFormer's re-crops end on), a whole frame
    gets a feature-space crop on the grid of the largest stride with mmseg's cat_max_ratio
    retries and the re-crops. Under DDP each rank takes its share of the same global batch.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        sampling: SamplingConfig,
        data: TrainData,
        max_stride: int,
        start: int,
        stop: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.cfg, self.sampling, self.data, self.max_stride = cfg, sampling, data, max_stride
        self.start, self.stop = start, stop
        self.rank, self.world = rank, world
        rcs = sampling.rcs()
        self.table = RcsTable(data.class_pixels, rcs) if rcs is not None else None
        self.wanted = rcs.wanted if rcs is not None else 0.0
        self.size = tuple(data.reader.label(data.rows[0], 0).shape[-2:])

    def __len__(self) -> int:
        return self.stop - self.start

    def pick(self, rng: np.random.Generator) -> Pick:
        """One sample's image, draw, views, crop and flip."""
        sampling, data = self.sampling, self.data
        cls = None
        if self.table is not None:
            cls, i = self.table.draw(rng)
        else:
            i = int(rng.integers(len(data.rows)))
        row = data.rows[i]
        if data.draw_pixels is not None:  # crop draws: cut at encode, read whole
            if cls is None:
                draw = int(rng.integers(data.views.draws))
            else:
                draw = pick_draw(rng, data.draw_pixels[row], cls, self.wanted)
            return Pick(row, draw, data.views.pick(rng, draw))
        draw = int(rng.integers(data.views.draws))
        y0 = x0 = 0
        if sampling.feature_crop:
            label = data.reader.label(row, draw).numpy()
            y0, x0 = rcs_crop(
                rng,
                label,
                self.size,
                tuple(sampling.feature_crop),
                sampling.cat_max_ratio,
                cls,
                self.wanted,
                self.max_stride,
            )
        flip = bool(sampling.flip and rng.random() < 0.5)
        return Pick(row, draw, data.views.pick(rng, draw), y0, x0, flip)

    def batch(self, it: int) -> list[Pick]:
        rng = np.random.default_rng([self.cfg.seed, it])
        return [self.pick(rng) for _ in range(self.cfg.batch_size)]

    def __iter__(self) -> Iterator[list[Pick]]:
        for it in range(self.start, self.stop):
            yield self.batch(it)[self.rank :: self.world]


def train(
    cfg: TrainConfig,
    sampling: SamplingConfig,
    loading: LoaderConfig,
    data: TrainData,
    work_dir: str | Path,
    device: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    live: Live | None = None,
) -> TrainResult:
    """Train on `data`; checkpoints in work_dir/checkpoint, resumed when they match.

    `live` (dvclive) gets the loss and the source-val scores as they come (a resumed run
    first replays the checkpoint's), so `dvc exp show` shows a queued run's progress.
    `stop_after` ends the run early (after a checkpoint) as a kill would; a rerun resumes.
    Resume is exact: batches and dropout depend on (seed, iteration) only. Under torchrun
    (`world` ranks, process group started) each rank trains on its share of every global batch
    and gradients are averaged; rank 0 evaluates and checkpoints.
    """
    device = resolve_device(device or cfg.device)
    specs = {PIXEL_KEY: (3, 1)} if cfg.features == "pixels" else data.specs
    ckpt_dir = Path(work_dir) / "checkpoint"
    identity = {
        "config": {
            k: v
            for k, v in dataclasses.asdict(cfg).items()
            if k not in ("device", "threads", "processes")
        },
        "sampling": dataclasses.asdict(sampling),
        "inputs": [[k, list(v)] for k, v in sorted(specs.items())],
        "data": data.fingerprint,
    }
    torch.manual_seed(cfg.seed)
    model, net, opt = _model_and_optimizer(cfg, specs, device, world)
    result = TrainResult(model=model)
    start = 0
    if ckpt_dir.is_dir():
        start = _load_checkpoint(ckpt_dir, identity, model, opt, result)
        result.resumed_from = start
    if live is not None:  # a resumed run's curves so far
        for point in result.curve:
            _log(live, point["step"], loss=point["loss"])
        for point in result.val:
            _log(live, point["step"], **{"val/mIoU": point["mIoU"], "val/aAcc": point["aAcc"]})

    max_stride = max(s for _, s in specs.values())
    check_batch_split(cfg, world)
    check_crop_stride(sampling, max_stride)
    stop = cfg.iterations if stop_after is None else min(stop_after, cfg.iterations)
    sampler = IterationSampler(cfg, sampling, data, max_stride, start, stop, rank, world)
    crop = None if data.draw_pixels is not None else sampling.feature_crop
    loader = data_loader(
        ViewsDataset(data.reader, crop),
        device,
        loading.workers,
        loading.prefetch,
        batch_sampler=sampler,
        collate_fn=collate,
    )
    autocast = torch.autocast(
        device_type=torch.device(device).type,
        dtype=torch.bfloat16,
        enabled=cfg.precision == "bf16",
    )
    t0 = time.perf_counter() - result.seconds
    running = result.pending
    model.train()
    bar = tqdm(total=cfg.iterations, initial=start, desc="train", disable=not progress or rank > 0)
    it = start
    for batch in loader:
        factor = lr_factor(cfg, it)
        loss = _step(net, opt, batch, cfg, it, factor, device, autocast)
        running.append(mean_over_ranks(loss, world, device))
        it += 1
        bar.update(1)
        if it % cfg.log_interval == 0 or it == cfg.iterations:
            result.curve.append(
                {"step": it, "loss": float(np.mean(running)), "lr": cfg.lr * factor}
            )
            bar.set_postfix(loss=f"{result.curve[-1]['loss']:.3f}")
            running = []
            if live is not None and rank == 0:
                _log(live, it, loss=result.curve[-1]["loss"])
        evaluate_now = cfg.eval_interval and it % cfg.eval_interval == 0
        if data.val is not None and (evaluate_now or it == cfg.iterations) and rank == 0:
            _validate(model, data.val, cfg, loading, device, it, result, live)
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


def _step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: Sample,
    cfg: TrainConfig,
    it: int,
    factor: float,
    device: str,
    autocast: torch.autocast,
) -> float:
    """One optimisation step at iteration `it` (lr x `factor`); its loss."""
    # Per-iteration seed: dropout draws depend on (seed, it) only, so resume is exact.
    torch.manual_seed(cfg.seed * 1_000_003 + it + 500_000)
    for g in opt.param_groups:
        g["lr"] = cfg.lr * g["lr_mult"] * factor
    feats = to_device(batch.features, device)  # int8 decoded there
    label = batch.label.to(device, non_blocking=True).long()
    with autocast:
        loss, _ = views_loss(net, feats, label, cfg.view_loss())
    if not torch.isfinite(loss):
        raise ModelError(f"training diverged at iteration {it}: loss {loss.item()}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip is not None:  # DIFF: mmseg/models/uda/dacs.py:171, every iteration
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    opt.step()
    return loss.item()


def _model_and_optimizer(
    cfg: TrainConfig, specs: dict[str, tuple[int, int]], device: str, world: int
) -> tuple[SegModel, torch.nn.Module, torch.optim.Optimizer]:
    """A fresh model, the module the loss runs through (DDP's wrapper under torchrun) and
    AdamW with the head at lr x head_lr_mult."""
    model = build_model(cfg, specs).to(device)
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
    return model, net, opt


def _validate(
    model: SegModel,
    val: RowsDataset,
    cfg: TrainConfig,
    loading: LoaderConfig,
    device: str,
    it: int,
    result: TrainResult,
    live: Live | None,
) -> None:
    """The source-val mIoU and aAcc at iteration `it`, into the result and dvclive."""
    how = Inference("whole", None, None, cfg.batch_size, loading.workers, loading.prefetch)
    s = evaluate_dataset(model, val, how, device, progress=False)[0].scores()
    result.val.append({"step": it, "mIoU": s["mIoU"], "aAcc": s["aAcc"]})
    if live is not None:
        _log(live, it, **{"val/mIoU": s["mIoU"], "val/aAcc": s["aAcc"]})
    model.train()


def _log(live: Live, step: int, **values: float) -> None:
    """Values at `step` into dvclive's curves and summary (written at once)."""
    live.step = step
    for name, value in values.items():
        live.log_metric(name, value)
    live.make_summary()


def clear_checkpoint(work_dir: str | Path) -> None:
    """Remove work_dir/checkpoint (after the final model is saved)."""
    remove_written(Path(work_dir) / "checkpoint")


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
        print(f"train: {path}: unreadable checkpoint; starting over", flush=True)
        return 0
    if meta.get("identity") != json.loads(json.dumps(identity)):
        # Another config or other data: never resumed, and said so.
        old, new = meta.get("identity", {}), json.loads(json.dumps(identity))
        changed = sorted(
            k
            for k in set(old.get("config", {})) | set(new["config"])
            if old.get("config", {}).get(k) != new["config"].get(k)
        )
        what = f"train.{', train.'.join(changed)}" if changed else "the input features"
        print(f"train: {path}: checkpoint of other settings ({what} differ); starting over")
        remove_written(path)
        return 0
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    opt.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    result.curve = meta["curve"]
    result.val = meta["val"]
    result.pending = meta["pending"]
    result.seconds = float(meta["seconds"])
    print(f"train: resuming from iteration {meta['iteration']} ({path})", flush=True)
    return int(meta["iteration"])


def diff_inputs(cfg: TrainConfig, specs: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The features the head reads: DIFF's finecoder discards stride 64 (finecoder.py:173-180)."""
    if cfg.fusion != "diff":
        return specs
    return {k: v for k, v in specs.items() if v[1] <= max(OUT_STRIDES)}


def _fingerprint(what: object) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def check_batch_split(cfg: TrainConfig, world: int) -> None:
    """Each of the `world` processes takes an equal share of every batch."""
    if cfg.batch_size % world:
        raise ConfigError(
            f"train.batch_size {cfg.batch_size}: must be a multiple of the "
            f"{world} processes (each takes an equal share)"
        )


def check_crop_stride(sampling: SamplingConfig, max_stride: int) -> None:
    """Feature-space crops cut whole cells of the coarsest map (`max_stride` pixels)."""
    crop = sampling.feature_crop
    if crop and (crop[0] % max_stride or crop[1] % max_stride):
        raise ConfigError(
            f"sampling.feature_crop {crop} must be a multiple of the largest stride {max_stride}"
        )


def check_pixel_input(cfg: TrainConfig, crop_draws: bool) -> None:
    """The pixel baseline reads whole frames, so the source must not be encoded as crop draws."""
    if cfg.features == "pixels" and crop_draws:
        raise ConfigError(
            "train.features pixels reads whole frames; the source was encoded as crop draws "
            "(encode.crop): set encode.crop: null"
        )


def source_data(
    cfg: TrainConfig,
    encoded_dir: str | Path,
    features_dir: str | Path,
    timesteps: list[int],
    threads: int = 1,
) -> TrainData:
    """The source domain's training set (its readers, rows and sampling statistics) and its val
    split, from data/encoded's index and the stores of `timesteps`."""
    index = read_index(encoded_dir)
    source = source_domain(index)
    train_set, train_rows = split_rows(index, source, "train")  # type: ignore[misc]
    val = split_rows(index, source, "val")
    rows = set_index(index, train_set)
    counts = class_pixels(rows.iloc[train_rows])
    draw_pixels = open_draw_pixels(encoded_dir, train_set)
    if cfg.features == "pixels":
        check_pixel_input(cfg, draw_pixels is not None)
        canvas = encoded_resolution(encoded_dir, train_set)
        reader = PixelReader(rows, canvas)
        val_set = None
        if val is not None:
            val_rows = set_index(index, val[0])
            val_set = RowsDataset(
                PixelReader(val_rows, encoded_resolution(encoded_dir, val[0])), val[1]
            )
        fingerprint = _fingerprint([list(rows["sha256"]), canvas])
        return TrainData(reader, train_rows, {}, Views((0,), 1), counts, None, fingerprint, val_set)
    paths = [store_path(features_dir, t, train_set) for t in timesteps]
    specs = diff_inputs(cfg, tap_specs(paths))
    reader = FeatureReader(
        paths, encoded_dir=encoded_dir, set_name=train_set, keys=list(specs), threads=threads
    )
    views = Views((0,), reader.draws)
    if cfg.train_variants or cfg.consistency_weight > 0 or cfg.guided_weight > 0:
        names = read_prompts(encoded_dir).names
        views = Views(
            tuple(prompt_indices(cfg.train_variants or names[:1], names)),
            reader.draws,
            cfg.pairing if cfg.consistency_weight > 0 else None,
            prompt_indices([GUIDED], names)[0] if cfg.guided_weight > 0 else None,
        )
    val_set = None
    if val is not None:
        val_paths = [store_path(features_dir, t, val[0]) for t in timesteps]
        val_reader = FeatureReader(
            val_paths, encoded_dir=encoded_dir, set_name=val[0], keys=list(specs), threads=threads
        )
        val_set = RowsDataset(val_reader, val[1])
    identities = [FeatureStore.open(p).identity.to_attrs() for p in paths]
    fingerprint = _fingerprint([identities, train_rows])
    return TrainData(reader, train_rows, specs, views, counts, draw_pixels, fingerprint, val_set)


def run(
    cfg: TrainConfig,
    sampling: SamplingConfig,
    loading: LoaderConfig,
    timesteps: list[int],
    encoded_dir: str,
    features_dir: str,
    out: str,
    work: str,
    metrics_path: str,
    plots_dir: str,
    live_dir: str,
) -> None:
    """The train stage: source readers (in memory or streamed: cache/preload.py), train, write
    outputs (dvclive's curves in `live_dir`). Under torchrun every rank trains; rank 0
    evaluates and writes."""
    set_threads(cfg.threads)
    rank, world, device = init_distributed(resolve_device(cfg.device, "train.device"))
    data = source_data(cfg, encoded_dir, features_dir, timesteps, loading.read_threads)
    if cfg.features != "pixels":
        variants = [v for d in range(data.views.draws) for v in data.views.variants_of(d)]
        data.reader = within_budget(
            data.reader, data.rows, variants, loading, f"train split (rank {rank})"
        )
        if data.val is not None and rank == 0:
            reader = within_budget(data.val.reader, data.val.rows, [0], loading, "val split")
            data.val = RowsDataset(reader, data.val.rows)
    if rank > 0:
        data.val = None
    live = open_live(live_dir) if rank == 0 else None
    result = train(cfg, sampling, loading, data, work, device, rank=rank, world=world, live=live)
    if world > 1:
        dist.destroy_process_group()
    if rank > 0:
        return
    live.end()
    result.model.save_pretrained(out)
    curve_png(result.curve, result.val, f"{plots_dir}/curve.png")
    # What dvclive does not hold: the run's totals (its curves hold loss and val scores).
    write_json(
        metrics_path,
        {
            "iterations": result.iterations_done,
            "seconds": round(result.seconds, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "processes": world,
        },
    )
    print(
        f"train: {cfg.features} features, {result.iterations_done} iterations in "
        f"{result.seconds:.1f} s on {device} x {world}, peak RSS {peak_rss_mb():.0f} MB"
    )
    clear_checkpoint(work)
