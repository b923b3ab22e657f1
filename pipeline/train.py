"""Training of fusion + head from cached features (or pixels, for the baseline); no UNet here."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from pipeline.baselines import PIXEL_KEY, pixel_fusion_config
from pipeline.classes import IGNORE_INDEX, NUM_CLASSES
from pipeline.consistency import PromptLossConfig, views_loss
from pipeline.device import resolve_device
from pipeline.errors import ModelError
from pipeline.evaluate import evaluate_dataset
from pipeline.fileio import atomic_path
from pipeline.fusion import FusionConfig
from pipeline.heads import HeadConfig, SegModel


@dataclass
class TrainConfig:
    """The `train` params group. DIFF: lr 6e-5, head x10, wd 0.01, warm-up 1500, 40k iterations."""

    features: str = "diffusion"  # diffusion | pixels (the from-scratch baseline)
    fusion: str = "stride"  # stride | hyperfeatures
    head: str = "daformer"  # daformer | mlp
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # at strides 4/8/16/32
    hyper_channels: int = 64
    embed_dim: int = 64
    dropout: float = 0.1
    iterations: int = 600
    batch_size: int = 8
    lr: float = 6e-4
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup: int = 50
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    crop: list[int] | None = None  # [h, w] in image pixels, a multiple of the largest stride
    flip: bool = True
    rare_class_sampling: bool = False
    rcs_temperature: float = 0.01
    seed: int = 0
    log_interval: int = 10
    eval_interval: int = 200  # source-val mIoU every n iterations (and at the end); 0 = end only
    checkpoint_interval: int = 100
    # Prompt variants (pipeline.consistency; names from the `prompts` group): [] = variant 0 only.
    train_variants: list[str] = field(default_factory=list)
    consistency_weight: float = 0.0  # > 0: consistency between two variants of each image
    consistency: str = "kl"  # kl (symmetric, softmax) | mse (logits)
    pairing: str = "random"  # random (another train variant) | anchor (the first train variant)
    guided_weight: float = 0.0  # > 0: DIFF's guided path (CE on it + MSE to view 0's logits)
    guided_consistency_weight: float = 1.0
    num_workers: int = 0
    device: str = "auto"  # auto = cuda when available (bf16 autocast there), else cpu
    # CPU threads for torch; 0 = torch's default. On a busy shared CPU one thread is several
    # times faster than two fighting over cores (measured: benchmarks/results).
    threads: int = 1


@dataclass
class TrainResult:
    """The trained model and its curves."""

    model: SegModel
    curve: list[dict] = field(default_factory=list)  # {"step", "loss", "lr"}
    val: list[dict] = field(default_factory=list)  # {"step", "mIoU", "aAcc"}
    iterations_done: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    pending: list[float] = field(default_factory=list)  # losses since the last curve point


def prompt_loss_config(cfg: TrainConfig) -> PromptLossConfig:
    """The prompt-variant options of the train group."""
    names = {f.name for f in dataclasses.fields(PromptLossConfig)}
    return PromptLossConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})


def build_model(cfg: TrainConfig, input_specs: dict[str, tuple[int, int]]) -> SegModel:
    """A fresh SegModel for the configured fusion/head on inputs {key: (channels, stride)}."""
    if cfg.features == "pixels":
        fusion = pixel_fusion_config(cfg.widths)
    elif cfg.features == "diffusion":
        fusion = FusionConfig(
            kind=cfg.fusion,
            inputs={k: [int(c), int(s)] for k, (c, s) in sorted(input_specs.items())},
            widths=list(cfg.widths),
            channels=cfg.hyper_channels,
        )
    else:
        raise ModelError(f"unknown train.features {cfg.features!r} (diffusion | pixels)")
    head = HeadConfig(kind=cfg.head, embed_dim=cfg.embed_dim, dropout=cfg.dropout)
    return SegModel(fusion, head)


def lr_factor(cfg: TrainConfig, it: int) -> float:
    """Linear warm-up from warmup_ratio, then poly decay to 0 (mmseg's schedule as in DAFormer)."""
    poly = (1.0 - it / max(cfg.iterations, 1)) ** cfg.poly_power
    if it < cfg.warmup:
        k = (1.0 - it / cfg.warmup) * (1.0 - cfg.warmup_ratio)
        return poly * (1.0 - k)
    return poly


def class_pixel_counts(labels: Sequence[torch.Tensor] | Iterator[torch.Tensor]) -> np.ndarray:
    """(N, classes) pixel counts per image, for rare-class sampling."""
    rows = []
    for lab in labels:
        lab = torch.as_tensor(lab).reshape(-1).long()
        lab = lab[lab != IGNORE_INDEX]
        rows.append(torch.bincount(lab, minlength=NUM_CLASSES)[:NUM_CLASSES].numpy())
    return np.stack(rows).astype(np.int64)


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
    """Batches of (row, y0, x0, flip) that depend only on (seed, iteration): resume is exact."""

    def __init__(
        self,
        cfg: TrainConfig,
        n: int,
        sizes: tuple[int, int],
        max_stride: int,
        start: int,
        stop: int,
        counts: np.ndarray | None = None,
    ) -> None:
        self.cfg, self.n, self.sizes, self.max_stride = cfg, n, sizes, max_stride
        self.start, self.stop = start, stop
        self.class_probs = None
        if cfg.rare_class_sampling and counts is not None:
            self.class_probs = rcs_class_probs(counts, cfg.rcs_temperature)
            self.images_with = [np.flatnonzero(counts[:, c] > 0) for c in range(counts.shape[1])]

    def __len__(self) -> int:
        return self.stop - self.start

    def batch(self, it: int) -> list[tuple[int, int, int, bool]]:
        rng = np.random.default_rng([self.cfg.seed, it])
        out = []
        for _ in range(self.cfg.batch_size):
            if self.class_probs is not None:
                c = rng.choice(len(self.class_probs), p=self.class_probs)
                row = int(rng.choice(self.images_with[c]))
            else:
                row = int(rng.integers(self.n))
            y0 = x0 = 0
            if self.cfg.crop:
                H, W = self.sizes
                ch, cw = self.cfg.crop
                y0 = int(rng.integers((H - ch) // self.max_stride + 1)) * self.max_stride
                x0 = int(rng.integers((W - cw) // self.max_stride + 1)) * self.max_stride
            flip = bool(self.cfg.flip and rng.random() < 0.5)
            out.append((row, y0, x0, flip))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int, int, bool]]]:
        for it in range(self.start, self.stop):
            # Seeds torch too: a reader drawing random variants in-process stays reproducible.
            torch.manual_seed(self.cfg.seed * 1_000_003 + it)
            yield self.batch(it)


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
    train_set: Dataset,
    input_specs: dict[str, tuple[int, int]],
    work_dir: str | Path,
    val_set: Dataset | None = None,
    device: str | None = None,
    data_fingerprint: str = "",
    class_counts: np.ndarray | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train from `train_set` (reader sample dicts); checkpoints in work_dir/checkpoint, resumed.

    `class_counts` (N, classes) pixel counts per image feed rare-class sampling (else computed).
    `stop_after` ends the run early (after a checkpoint) as a kill would; a rerun resumes.
    Resume is exact with num_workers=0 (batches and dropout depend on (seed, iteration) only).
    """
    device = resolve_device(device or cfg.device)
    if cfg.features == "pixels":
        input_specs = {PIXEL_KEY: (3, 1)}
    work_dir = Path(work_dir)
    ckpt_dir = work_dir / "checkpoint"
    identity = {
        "config": {
            k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "threads")
        },
        "inputs": [[k, list(v)] for k, v in sorted(input_specs.items())],
        "data": data_fingerprint,
    }

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, input_specs).to(device)
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
    if cfg.crop and (cfg.crop[0] % max_stride or cfg.crop[1] % max_stride):
        raise ModelError(
            f"train.crop {cfg.crop} must be a multiple of the largest stride {max_stride}"
        )
    counts = class_counts
    if cfg.rare_class_sampling and counts is None:
        counts = class_pixel_counts(train_set[i]["label"] for i in range(len(train_set)))
    stop = cfg.iterations if stop_after is None else min(stop_after, cfg.iterations)
    sampler = IterationSampler(cfg, len(train_set), sizes, max_stride, start, stop, counts)
    loader = DataLoader(
        _Augmented(train_set, cfg.crop),
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        persistent_workers=False,
    )
    use_amp = torch.device(device).type == "cuda"
    t0 = time.perf_counter() - result.seconds
    running = result.pending
    model.train()
    bar = tqdm(total=cfg.iterations, initial=start, desc="train", disable=not progress)
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
        label = batch["label"].to(device)
        if next(iter(feats.values())).ndim == 5:  # VariantViews: (B, views, C, h, w)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss, _ = views_loss(model, feats, label, prompt_loss_config(cfg))
        else:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = model(feats)
            logits = F.interpolate(
                logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False
            )
            loss = F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX)
        if not torch.isfinite(loss):
            raise ModelError(f"training diverged at iteration {it}: loss {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(loss.item())
        it += 1
        bar.update(1)
        if it % cfg.log_interval == 0 or it == cfg.iterations:
            result.curve.append(
                {"step": it, "loss": float(np.mean(running)), "lr": cfg.lr * factor}
            )
            bar.set_postfix(loss=f"{result.curve[-1]['loss']:.3f}")
            running = []
        evaluate_now = cfg.eval_interval and it % cfg.eval_interval == 0
        if val_set is not None and (evaluate_now or it == cfg.iterations):
            s = evaluate_dataset(model, val_set, device=device, progress=False).scores()
            result.val.append({"step": it, "mIoU": s["mIoU"], "aAcc": s["aAcc"]})
            model.train()
        if it % cfg.checkpoint_interval == 0 or it == stop:
            result.iterations_done = it
            result.seconds = time.perf_counter() - t0
            result.pending = running
            _save_checkpoint(ckpt_dir, identity, model, opt, result)
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
    state = opt.state_dict()
    tensors = {
        f"{pid}.{name}": v.detach().cpu().contiguous()
        for pid, entry in state["state"].items()
        for name, v in entry.items()
    }
    meta = {
        "identity": identity,
        "iteration": result.iterations_done,
        "seconds": result.seconds,
        "curve": result.curve,
        "val": result.val,
        "pending": result.pending,
        "param_groups": state["param_groups"],
    }
    with atomic_path(path) as tmp:
        tmp.mkdir()
        model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(model_state, str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
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
    flat = load_file(str(path / "optimizer.safetensors"), device=str(device))
    opt_state: dict = {}
    for key, v in flat.items():
        pid, name = key.split(".", 1)
        # AdamW keeps `step` on the CPU unless capturable/fused.
        opt_state.setdefault(int(pid), {})[name] = v.cpu() if name == "step" else v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": opt_state, "param_groups": groups})
    result.curve = meta["curve"]
    result.val = meta["val"]
    result.pending = meta["pending"]
    result.seconds = float(meta["seconds"])
    return int(meta["iteration"])
