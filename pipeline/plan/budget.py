"""What a run costs before it starts: images and draws, UNet passes, bytes of every store, the
DVC cache's extra bytes, free disk and GPU-hours, from params.yaml and the model's architecture.

Bytes of feature stores are exact but for their metadata (cache/store.py's `store_bytes`, the
layout FeatureStore.create writes); latents, labels and trajectories are zstd-compressed on
disk, so their raw bytes here are an upper bound. UNet passes count what the loops run
(diffusion/inversion.py's `passes`, diffusion/unet_features.py's `variant_passes`). GPU-hours are
derived from the UNet's counted FLOPs at a utilization of a GPU's peak, unless a measured pass
rate is given: the table says which.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dvc.config import Config
from dvc.exceptions import DvcException
from torch.utils.flop_counter import FlopCounterMode

from pipeline.cache.encoded import (
    BOXES_NAME,
    DRAW_PIXELS_NAME,
    GUIDED_LATENTS_NAME,
    INDEX_NAME,
    LABELS_NAME,
    LATENTS_NAME,
    crops_set,
    open_draw_pixels,
    read_index,
    rows_array_files,
)
from pipeline.cache.store import StoreLayout, store_path
from pipeline.cache.trajectories import GUIDED_NAME, PLAIN_NAME
from pipeline.core.errors import ConfigError, DataError, PipelineError
from pipeline.core.fileio import folder_bytes
from pipeline.core.names import GUIDED_DIFF_PROMPT
from pipeline.core.params import read_group, read_timesteps
from pipeline.data.datasets import DataConfig, DatasetEntry, find_pairs
from pipeline.diffusion.build import ModelConfig, model_architecture, sd21_architecture
from pipeline.diffusion.inversion import passes as trajectory_passes
from pipeline.diffusion.model import DTYPES, DiffusionModel
from pipeline.diffusion.prompts import DIFF_CLASS_PROMPTS, PromptConfig, variant_prompts
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.unet_features import variant_passes
from pipeline.extraction.noise import noise_mode
from pipeline.loops.cleandift import CleanDiftConfig
from pipeline.loops.encode import EncodeConfig
from pipeline.loops.extract import ExtractConfig
from pipeline.loops.invert import InvertConfig
from pipeline.loops.tune_prompt import TuneConfig

H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA H100 SXM datasheet, dense (no sparsity)
UTILIZATION = 0.4  # of that peak: what the derived GPU-hours assume
# DIFF's class prompts a training crop holds on average, where no encoded label says (two of the
# five in benchmarks/cost.py's draw: sidewalk and rider).
GUIDED_CLASSES = 2.0
FICLONE = 0x40049409  # linux/fs.h: share a file's blocks (reflink)


@dataclasses.dataclass
class Row:
    """One stage's work on one set (or one timestep): what it reads, runs and writes."""

    stage: str
    what: str
    images: int
    draws: int
    passes: float  # UNet forward passes (a training step's backward counts two more)
    bytes: int
    exact: bool = True  # False: an upper bound (zstd-compressed on disk)
    gflop_per_pass: float = 0.0
    files: int = 0  # of its outputs: what DVC stats, hashes, links and pushes one by one


@dataclasses.dataclass
class Budget:
    """A run's budget: rows per stage and set, the disk and the hours."""

    rows: list[Row]
    cache_type: str  # as configured (e.g. reflink,copy)
    link: str  # the first of those this filesystem supports
    free_bytes: int
    data_dir: Path
    pass_rate: float | None  # measured UNet passes per second, if given
    existing_bytes: int = 0  # of the outputs already on disk (replaced or resumed, and cached)
    # The files of the feature stores, latents and trajectories, by output under data/:
    # {"features/t<t>/<set>" | "encoded/<set>/<array>" | "trajectories/<set>/<array>": [file]}
    store_files: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)  # printed under the table
    # Per DVC command, seconds = intercept_s + per_1000_files_s x files / 1000, fitted by
    # benchmarks/dvc_scale.py (its "fit"); empty where no measurement is committed.
    dvc_fit: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def dvc_extra_bytes(self) -> int:
        """What DVC's cache adds: a copy of every output, or nothing for links."""
        return self.bytes if self.link == "copy" else 0

    @property
    def passes(self) -> float:
        return sum(r.passes for r in self.rows)

    @property
    def files(self) -> int:
        return sum(r.files for r in self.rows)

    def dvc_seconds(self) -> dict[str, float]:
        """DVC's own seconds per command at this run's file count (the measured fit)."""
        return {
            command: f["intercept_s"] + f["per_1000_files_s"] * self.files / 1000
            for command, f in self.dvc_fit.items()
        }

    def gpu_hours(self, rows: list[Row] | None = None) -> float:
        """Measured pass rate if given, else derived from FLOPs at UTILIZATION of an H100."""
        rows = self.rows if rows is None else rows
        if self.pass_rate:
            return sum(r.passes for r in rows) / self.pass_rate / 3600
        flop_s = H100_BF16_DENSE_TFLOPS * 1e12 * UTILIZATION
        return sum(r.passes * r.gflop_per_pass * 1e9 for r in rows) / flop_s / 3600

    @property
    def needed_bytes(self) -> int:
        """Disk the run still takes: its outputs beyond those already here (kept, or replaced
        after DVC cached them), doubled when DVC's cache copies."""
        new = max(0, self.bytes - self.existing_bytes)
        return new * (2 if self.link == "copy" else 1)

    def check_fits(self) -> None:
        """One ConfigError line when the outputs (and DVC's copies) cannot fit the free disk."""
        need = self.needed_bytes
        if need > self.free_bytes:
            copies = f"; DVC's cache copies every output ({self.cache_type} on this disk)"
            raise ConfigError(
                f"the run needs {_size(need)} more disk ({_size(self.bytes)} of "
                f"outputs, {_size(self.existing_bytes)} of them here"
                + (copies if self.link == "copy" else "")
                + f"), but {self.data_dir} has {_size(self.free_bytes)} free; "
                "`python -m pipeline.plan` shows where it goes"
            )

    def table(self) -> str:
        """The budget as a Markdown table and a summary."""
        derived = "measured" if self.pass_rate else f"derived: H100 bf16 at {UTILIZATION:.0%}"
        lines = [
            f"| stage | what | images | draws | UNet passes | GPU-hours ({derived}) | bytes "
            "| files |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            size = _size(r.bytes) if r.exact else f"<= {_size(r.bytes)}"
            lines.append(
                f"| {r.stage} | {r.what} | {r.images:,} | {r.draws} | {r.passes:,.0f} | "
                f"{self.gpu_hours([r]):,.2f} | {size} | {r.files:,} |"
            )
        lines.append(
            f"| **all** | | | | **{self.passes:,.0f}** | **{self.gpu_hours():,.1f}** | "
            f"**{_size(self.bytes)}** | **{self.files:,}** |"
        )
        need = self.needed_bytes
        lines += ["", *self.notes] if self.notes else []
        lines += [
            "",
            f"DVC cache: cache.type {self.cache_type}; this filesystem takes {self.link}: "
            f"{_size(self.dvc_extra_bytes)} more.",
            *self._dvc_line(),
            f"Disk: {_size(need)} needed ({_size(self.existing_bytes)} of outputs already "
            f"here), {_size(self.free_bytes)} free at {self.data_dir}"
            + (" (fits)." if need <= self.free_bytes else " (DOES NOT FIT)."),
        ]
        return "\n".join(lines)

    def _dvc_line(self) -> list[str]:
        seconds = self.dvc_seconds()
        if not seconds:
            return []
        said = ", ".join(
            f"{label} {seconds[c]:,.0f} s" for c, label in DVC_COMMANDS.items() if c in seconds
        )
        return [
            f"DVC's own time at {self.files:,} files (benchmarks/results/dvc_scale.json's fit, "
            f"on the machine it names): {said}."
        ]


# The commands benchmarks/dvc_scale.py times, as the plan names them.
DVC_COMMANDS = {
    "status": "dvc status",
    "repro_noop": "a no-op dvc repro",
    "exp_run": "dvc exp run -S (no store touched)",
    "exp_temp": "a --temp experiment",
    "exp_queue": "a queued experiment",
    "push": "dvc push",
}
DVC_SCALE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "dvc_scale.json"


def dvc_fit(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """benchmarks/dvc_scale.py's per-command fit, or {} where none is committed."""
    try:
        return json.loads((path or DVC_SCALE).read_text())["fit"]
    except (OSError, KeyError, ValueError):
        return {}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1000
    raise AssertionError


# ---- images ------------------------------------------------------------------------------


def split_counts(data: DataConfig, images: dict[str, int]) -> dict[str, dict[str, int]]:
    """{domain: {split: images}}: synthetic counts, `images` ("<domain>" for the source's train
    or a target's split, "<domain>.val" for a source's val split), else the files on disk."""
    out = {data.source_name: _source_counts(data.source, data.source_name, images)}
    for name, entry in data.targets.items():
        if entry.kind == "synthetic":
            out[name] = {"val": int(entry.count or 0)}
        else:
            out[name] = {"val": _count(entry, name, entry.split, images, name)}
    return out


def _source_counts(entry: DatasetEntry, name: str, images: dict[str, int]) -> dict[str, int]:
    if entry.kind == "synthetic":
        return {"train": int(entry.count or 0), "val": int(entry.val_count or 0)}
    if entry.val_split is not None:
        return {
            "train": _count(entry, name, entry.split, images, name),
            "val": _count(entry, name, entry.val_split, images, f"{name}.val"),
        }
    total = _count(entry, name, entry.split, images, name)
    if entry.val_fraction == 0:
        return {"train": total}
    n_val = max(1, round(total * float(entry.val_fraction or 0)))  # as holdout_split draws it
    return {"train": total - n_val, "val": n_val}


def _count(entry: DatasetEntry, name: str, split: str, images: dict[str, int], key: str) -> int:
    if key in images:
        return min(images[key], entry.limit or images[key])
    if not Path(entry.root).is_dir():
        raise ConfigError(
            f"{name}: {entry.root} is not here to count its images; give the count "
            f"(python -m pipeline.plan --images {key}=N)"
        )
    try:
        return len(find_pairs(entry, split))
    except DataError as e:
        raise ConfigError(f"{name}: cannot count its images ({e})") from None


# ---- the plan ----------------------------------------------------------------------------


def plan(
    params: dict[str, Any],
    images: dict[str, int] | None = None,
    guided_classes: float | None = None,
    pass_rate: float | None = None,
    root: str | os.PathLike[str] = ".",
    model: DiffusionModel | None = None,
    source: str = "params.yaml",
    count_flops: bool = True,
) -> Budget:
    """The budget of `params` run in the project at `root` (its .dvc/config, its disk);
    `count_flops` False skips the FLOP count (GPU-hours then 0: check_params needs bytes).
    `guided_classes`: DIFF's class prompts per training draw; None: counted from the encoded
    labels at `root` where they hold the set, else GUIDED_CLASSES (the table says which)."""
    data = read_group(params, "data", DataConfig, source)
    enc = read_group(params, "encode", EncodeConfig, source)
    ext = read_group(params, "extract", ExtractConfig, source)
    inv = read_group(params, "invert", InvertConfig, source).inversion()
    prompts = read_group(params, "prompts", PromptConfig, source)
    tune = read_group(params, "tune_prompt", TuneConfig, source)
    timesteps = read_timesteps(params, source)
    if model is None:
        mcfg = read_group(params, "model", ModelConfig, source)
        here = mcfg.source == "build" or Path(mcfg.source).is_dir()
        model = model_architecture(mcfg) if here else sd21_architecture()
    taps = resolve_taps(model.unet, ext.taps, model.vae_stride)
    texts = list(variant_prompts(prompts).values())
    guided = GUIDED_DIFF_PROMPT in texts
    counts = split_counts(data, images or {})
    resolutions = data.resolutions(enc.resolution)
    flops: dict[tuple[int, int], float] = {}

    def gflop(canvas: tuple[int, int]) -> float:
        if count_flops and canvas not in flops:
            flops[canvas] = unet_gflop(model, canvas)
        return flops.get(canvas, 0.0)

    rows: list[Row] = []
    notes: list[str] = []
    store_files_: dict[str, list[str]] = {}
    sets = encoded_sets(data, enc, counts)
    train_set = next((name for name, (_, n_train, _) in sets.items() if n_train), None)
    if not guided or train_set is None:
        guided_classes = 0.0
    else:
        how = "given"
        if guided_classes is None:
            counted = count_guided_classes(Path(root) / "data" / "encoded", train_set)
            how = f"counted in the encoded labels of {train_set}"
            if counted is None:
                how = "assumed (no encoded labels of that set here; --guided-classes N)"
            guided_classes = counted if counted is not None else GUIDED_CLASSES
        notes.append(
            f"Guided passes: {guided_classes:.2f} of DIFF's {len(DIFF_CLASS_PROMPTS)} class "
            f"prompts a training draw, {how}."
        )
    for name, (n, n_train, canvas) in sets.items():
        k = enc.draws if n_train else 1  # as encode: K draws in a set holding training images
        s = model.vae_stride
        lat = model.unet.config.in_channels * (canvas[0] // s) * (canvas[1] // s)
        two = 2 if (enc.posterior == "sample" and guided) else 1  # the guided view's own sample
        lat_shape = (n, k, model.unet.config.in_channels, canvas[0] // s, canvas[1] // s)
        crop = name == crops_set(data.source_name) and enc.crop
        arrays = {LATENTS_NAME: lat_shape, LABELS_NAME: (n, k, *canvas) if crop else (n, *canvas)}
        if two == 2:  # encode gives every set the guided view's own posterior sample
            arrays[GUIDED_LATENTS_NAME] = lat_shape
        if crop:
            arrays |= {BOXES_NAME: (n, k, 4), DRAW_PIXELS_NAME: (n, k, 19)}
        for array, shape in arrays.items():
            store_files_[f"encoded/{name}/{array}"] = rows_array_files(shape)
        rows.append(
            Row(
                "encode",
                f"{name}: latents and labels",
                n,
                k,
                0,
                n * k * lat * 4 + n_train * k * (two - 1) * lat * 4 + n * k * canvas[0] * canvas[1],
                exact=False,
                files=sum(len(rows_array_files(shape)) for shape in arrays.values()),
            )
        )
        g = gflop(canvas)
        guided_train = n_train if guided else 0
        if noise_mode(ext.noise_mode).inverts:
            runs = n * k * trajectory_passes(inv, 1)
            runs += guided_train * k * trajectory_passes(inv, 1 + guided_classes)
            steps = len(inv.steps)
            traj = rows_array_files((n, k, steps, *lat_shape[2:]))
            store_files_[f"trajectories/{name}/{PLAIN_NAME}"] = traj
            if guided_train:
                store_files_[f"trajectories/{name}/{GUIDED_NAME}"] = traj
            rows.append(
                Row(
                    "invert",
                    f"{name}: {steps} steps",
                    n,
                    k,
                    runs,
                    (n + guided_train) * k * steps * lat * 4,
                    exact=False,
                    gflop_per_pass=g,
                    files=len(traj) * (2 if guided_train else 1),
                )
            )
        shapes = {t.name: (t.channels, canvas[0] // t.stride, canvas[1] // t.stride) for t in taps}
        per_draw = sum(variant_passes(text, ext.conditioning) for text in texts)
        runs = n * k * per_draw + guided_train * k * guided_classes  # class passes: train rows
        strides = {t.name: t.stride for t in taps}
        layout = StoreLayout.sized(
            n, len(texts) * k, shapes, strides, ext.storage, ext.shard_mb, ext.batch_size
        )
        size, files = layout.bytes(), layout.files()
        for t in timesteps:
            store_files_[f"features/{store_path('', t, name)}"] = files
        rows.append(
            Row(
                f"extract@t x {len(timesteps)}",
                f"{name}: {len(texts)} variants, {layout.images_per_shard:,} images a shard",
                n,
                k,
                runs * len(timesteps),
                size * len(timesteps),
                gflop_per_pass=g,
                files=len(files) * len(timesteps),
            )
        )
    clean = read_group(params, "cleandift", CleanDiftConfig, source)
    if clean.steps:
        # Per step: the teacher at `bins` timesteps, the student once forward and backward (3).
        source_canvas = tuple(resolutions[data.source_name])
        images = clean.steps * clean.batch_size
        unet_bytes = sum(p.numel() for p in model.unet.parameters())
        unet_bytes *= DTYPES[read_group(params, "model.dtype", str, source)].itemsize
        rows.append(
            Row(
                "cleandift",
                f"{data.source_name}: {clean.steps} steps",
                images,
                1,
                images * (clean.bins + 3),
                unet_bytes,
                gflop_per_pass=gflop(source_canvas),
            )
        )
    targets = [d for d in counts if d != data.source_name]
    if tune.steps and targets:
        # Per target: steps x batch images at every timestep, forward and backward (3 passes),
        # and the scored images before and after.
        for name in targets:
            scored = tune.eval_images or counts[name]["val"]
            n = tune.steps * tune.batch_size * 3 + 2 * scored
            rows.append(
                Row(
                    "tune_prompt",
                    f"{name}: online UNet",
                    min(tune.images, scored),
                    1,
                    n * len(timesteps),
                    0,
                    gflop_per_pass=gflop(tuple(resolutions[name])),
                )
            )
    cache_type = dvc_cache_type(root)
    data_dir = existing(Path(root) / "data")
    here = sum(
        folder_bytes(Path(root) / "data" / out) for out in ("encoded", "trajectories", "features")
    )
    return Budget(
        rows,
        cache_type,
        link_type(cache_type, data_dir, Path(root) / ".dvc" / "cache"),
        shutil.disk_usage(data_dir).free,
        data_dir,
        pass_rate,
        here,
        store_files_,
        notes,
        dvc_fit(),
    )


def count_guided_classes(encoded_dir: Path, name: str) -> float | None:
    """DIFF's class prompts (its five classes present) per draw of a set's training images,
    counted in its encoded labels (crop draws' pixel counts, or the frames'), or None where
    `encoded_dir` does not hold that set."""
    if not (encoded_dir / INDEX_NAME).is_file():
        return None
    try:
        index = read_index(encoded_dir)
        rows = index[(index["set"] == name) & (index["split"] == "train")]
        if rows.empty:
            return None
        draws = open_draw_pixels(encoded_dir, name)
        pixels = (
            draws.reshape(-1, draws.shape[-1])
            if draws is not None
            else np.stack(rows["class_pixels"])
        )
    except (PipelineError, OSError, KeyError, ValueError):
        return None
    classes = sorted(DIFF_CLASS_PROMPTS)
    return float((pixels[:, classes] > 0).sum(axis=1).mean())


def encoded_sets(
    data: DataConfig, enc: EncodeConfig, counts: dict[str, dict[str, int]]
) -> dict[str, tuple[int, int, tuple[int, int]]]:
    """{set: (images, training images, canvas)} as encode groups them: a domain's frames, and
    with encode.crop the source's training images as crop draws in a set of their own."""
    resolutions = data.resolutions(enc.resolution)
    out = {}
    for name, splits in counts.items():
        canvas = tuple(resolutions[name])
        train = splits.get("train", 0)
        if enc.crop and train:
            out[crops_set(name)] = (train, train, tuple(enc.crop))
            train_in_frames = 0
        else:
            train_in_frames = train
        frames = train_in_frames + splits.get("val", 0)
        if frames:
            out[name] = (frames, train_in_frames, canvas)
    return out


def unet_gflop(model: DiffusionModel, canvas: tuple[int, int]) -> float:
    """GFLOPs of one UNet pass on a canvas (counted on the meta device: no weights needed)."""
    unet = model.unet
    with torch.device("meta"), torch.no_grad():
        ghost = type(unet).from_config(unet.config)
        s = model.vae_stride
        lat = torch.zeros(1, unet.config.in_channels, canvas[0] // s, canvas[1] // s)
        cross = unet.config.cross_attention_dim
        ctx = torch.zeros(1, 77, cross if isinstance(cross, int) else cross[0])
        with FlopCounterMode(display=False) as fc:
            ghost(lat, torch.tensor([50]), ctx)
    return fc.get_total_flops() / 1e9


# ---- the disk ----------------------------------------------------------------------------


def existing(path: Path) -> Path:
    """`path` or its nearest existing parent (where the outputs will go)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def dvc_cache_type(root: str | os.PathLike[str]) -> str:
    """cache.type as DVC reads it for the project at `root` (its local, repo, global and system
    configs merged); DVC's default where none sets it: reflink,copy."""
    try:
        kinds = Config(dvc_dir=Path(root) / ".dvc")["cache"].get("type")
    except DvcException as e:
        raise ConfigError(f"{root}/.dvc/config: DVC cannot read it ({e})") from None
    if not kinds:
        return "reflink,copy"
    return ",".join(kinds) if isinstance(kinds, list) else str(kinds)


def link_type(cache_type: str, data_dir: Path, cache_dir: Path | None = None) -> str:
    """The first of DVC's link types in `cache_type` that works from `cache_dir` (the DVC
    cache, or its nearest existing parent) to `data_dir` (tried on a temporary file); copy
    always works. A hard link across filesystems fails, and DVC copies then."""
    cache_dir = existing(cache_dir or data_dir)
    for kind in (k.strip() for k in cache_type.split(",")):
        if kind in ("copy", "symlink") or _supports(kind, cache_dir, data_dir):
            return kind
    return "copy"


def _supports(kind: str, cache_dir: Path, data_dir: Path) -> bool:
    with (
        tempfile.TemporaryDirectory(dir=cache_dir) as src_dir,
        tempfile.TemporaryDirectory(dir=data_dir) as dst_dir,
    ):
        src, dst = Path(src_dir) / "a", Path(dst_dir) / "b"
        src.write_bytes(b"x" * 4096)
        try:
            if kind == "hardlink":
                os.link(src, dst)
            elif kind == "reflink":
                with open(src, "rb") as s, open(dst, "wb") as d:
                    fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
            else:
                return False
        except OSError:
            return False
    return True
