"""What the cache saves, measured: online DIFF training against training from the cache, side by
side in one run, on the SD-2.1 architecture (random weights: the architecture sets the cost).

Both arms take the same training step of DIFF's recipe head (its fusion, finecoder and
DAFormer head, BatchNorm, the recipe's taps; batch 1, AdamW, gradients clipped at 5), on one
crop draw. The online arm computes every iteration's features through the project's own
feature path (pipeline/extraction: a VAE posterior sample of a fresh draw, the noise or, as
DIFF does, the inversion trajectory, the UNet passes of every timestep and path, the storage
rounding a store applies: the recipe's, `pca-64-int8`, unless --storage); the cached arm reads
a random row of a store of ROWS draws on disk through the training DataLoader, page cache
dropped before every round (root only; said in the results), int8 decoded where the head runs.
Settings: T = 1 and T = 9 timesteps (plain path, one-step noise), T = 9 with DIFF's guided path
(a second view: the class prompts over the mask, its own noise; CE + CE + MSE), and DIFF's own
iteration (its DDIM inversion to the last saved step, plain and guided, every iteration:
168 UNet passes, where DIFF's own code runs 185; features at the recipe's 9 timesteps).

Timing: both heads take a warm-up step on the draw's features (the online path has just run
once to fill the store), then the arms take turns (online, cached, online, ...) for each
setting's rounds of iterations (SETTINGS: 5 rounds of 3 iterations for T = 1 and T = 9; the
guided settings take minutes per online iteration on a CPU, so 5 rounds of 1 and, for DIFF's own
iteration, 3 rounds of 1); per arm the median and min-max of the per-iteration seconds of each
round, and the ratio of medians. The script's own checks (it
exits 1 and writes nothing when one fails): the store's row 0 holds exactly the values the
online arm computes for its draw (the other rows: random values of the same shapes, stored the
same way); online is slower than cached in every setting; more timesteps and paths cost more.
The sweep of 8 head experiments (GTA5: 24,966 images x 2 crop draws, 40k and 4k iterations) is
computed from the measured per-iteration times, with the break-even: the head iterations
(over all experiments) from which the cache costs less; the H100 figures are derived from
counted FLOPs at 40 % of its bf16 peak and kept apart, labelled derived.

Usage: python benchmarks/cost.py [--res 64 64] [--device cpu] [--storage pca-64-int8]
       python benchmarks/cost.py --device cuda --res 512 512      (the same, on a GPU, fp16 UNet)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from flops import H100_BF16_DENSE_TFLOPS, count  # this script's folder is on sys.path
from torch.utils.data import Dataset, RandomSampler

from pipeline.cache.reader import FeatureReader
from pipeline.cache.storage import Projection, StorageMode, parse_storage
from pipeline.cache.store import FeatureStore, StoreIdentity
from pipeline.core.device import data_loader
from pipeline.core.names import GUIDED_DIFF_PROMPT, FeatureKey
from pipeline.core.params import load_params, read_group
from pipeline.data.samples import Sample, collate, stack, to_device
from pipeline.diffusion.build import random_sd21_folder
from pipeline.diffusion.inversion import Inversion, invert, invert_guided, region_masks
from pipeline.diffusion.model import DiffusionModel, load_diffusion_model
from pipeline.diffusion.noising import draw_noise
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.unet_features import prompt_contexts
from pipeline.extraction.noise import noise_mode
from pipeline.extraction.recipe import FeatureRecipe, noised, read_values, tap_maps
from pipeline.heads.losses import views_loss
from pipeline.loops.invert import InvertConfig
from pipeline.loops.train import TrainConfig, build_model, diff_inputs
from pipeline.reporting.machine import Run, drop_page_cache

ROOT = Path(__file__).resolve().parents[1]
SD21 = ROOT / ".rehearsal" / "sd21-random"  # SD-2.1's architecture, random weights, built once
RESULTS = Path(__file__).resolve().parent / "results" / "cost.json"
PARAMS = load_params(ROOT / "params.yaml")
RECIPE = yaml.safe_load((ROOT / "recipes" / "diff-gta2cs.yaml").read_text())
T9 = list(RECIPE["timesteps"])  # DIFF's 9 (save_timestep on its 37-step schedule)
GTA5_IMAGES, DRAWS, UTILIZATION = 24966, 2, 0.4
ROWS = 64  # draws in the cached arm's store: random rows, read cold


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    timesteps: list[int]
    guided: bool  # DIFF's guided view too
    inversion: bool  # DIFF's 37-step inversion every iteration (else one-step noise at t)
    rounds: int  # timed rounds per arm
    iterations: int  # iterations per round


SETTINGS = [
    Setting("T1", T9[-1:], False, False, 5, 3),
    Setting("T9", T9, False, False, 5, 3),
    Setting("T9_guided", T9, True, False, 5, 1),
    Setting("diff_inversion_every_iteration", T9, True, True, 3, 1),
]


def recipe_inversion(**over: object) -> Inversion:
    """The recipe's inversion (its `invert` group over params.yaml's), some keys overridden."""
    group = {**PARAMS["invert"], **RECIPE["invert"], **over}
    return read_group({"invert": group}, "invert", InvertConfig).inversion()


class Counter:
    """UNet calls of the online arm, and the passes they make (a call batches prompts)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls = self.passes = 0
        unet.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.calls += 1
        self.passes += int(args[0].shape[0])


class Online:
    """One crop draw's features computed through the project's feature path, every call anew."""

    def __init__(
        self,
        model: DiffusionModel,
        taps,
        setting: Setting,
        hw: tuple[int, int],
        storage: str,
        projections: dict | None,
    ):
        self.model, self.setting = model, setting
        dev = model.device
        rng = np.random.default_rng(0)
        self.image = torch.from_numpy(rng.uniform(-1, 1, (1, 3, *hw)).astype(np.float32)).to(dev)
        label = np.zeros(hw, np.int64)  # road, a sidewalk and a rider: two of DIFF's five prompts
        label[: hw[0] // 2] = 1
        label[hw[0] // 2 :, : hw[1] // 3] = 12
        self.label = torch.from_numpy(label)
        self.contexts = prompt_contexts(model, ["", GUIDED_DIFF_PROMPT]).to(dev, model.dtype)
        self.recipes = {
            t: FeatureRecipe(
                taps, t, 0, noise_mode("add"), "diff", parse_storage(storage), projections
            )
            for t in setting.timesteps
        }
        self.raw: list[dict[str, torch.Tensor]] = []  # the last draw's maps, before storage
        self.inversion = recipe_inversion()
        self.draw = 0

    def latent(self, path: str) -> torch.Tensor:
        """A fresh VAE posterior sample (seeded by the draw: the cached arm's store holds it)."""
        dist = self.model.vae.encode(self.image.to(self.model.dtype)).latent_dist
        gen = torch.Generator().manual_seed(zlib.crc32(f"{path}:{self.draw}".encode()))
        eps = torch.randn(dist.mean.shape, generator=gen).to(dist.mean)
        return (dist.mean + dist.std * eps) * self.model.vae.config.scaling_factor

    def x_t(self, path: str) -> dict[int, torch.Tensor]:
        m, s = self.model, self.setting
        x0 = self.latent(path)
        sha = [f"draw{self.draw}-{path}"]
        if not s.inversion:
            return {
                t: noised(m, r, x0, sha, 0, "" if path == "plain" else path)
                for t, r in self.recipes.items()
            }
        steps = self.inversion.unet_timesteps()

        def noise(i: int, p: int) -> torch.Tensor:
            return draw_noise(sha, tuple(x0.shape[1:]), f"traj-{i}-{p}", 0).to(x0)

        plain = self.contexts.plain
        if path == "plain":
            xs = invert(m, x0, self.inversion, plain, plain, noise)
        else:
            size = tuple(x0.shape[-2:])
            present = sorted(set(torch.unique(self.label).tolist()) & set(self.contexts.diff))
            prompts = [(plain, torch.ones(1, 1, *size))]
            masks = region_masks(self.label, present, size)
            prompts += [(self.contexts.diff[c], mk) for c, mk in zip(present, masks, strict=True)]
            xs = invert_guided(m, x0, self.inversion, plain, [prompts], [noise])
        return {t: xs[steps.index(t)].to(m.dtype) for t in s.timesteps}

    @torch.no_grad()
    def views(self) -> list[dict[str, torch.Tensor]]:
        """The plain view's features (and the guided one's) as a reader of the store returns
        them, {key: (1, C, h, w)} float32; `raw` keeps the maps before storage."""
        out, self.raw = [], []
        for path in ("plain", "guided") if self.setting.guided else ("plain",):
            feats, raw = {}, {}
            for t, x in self.x_t(path).items():
                prompt = "" if path == "plain" else GUIDED_DIFF_PROMPT
                context = self.contexts.plain if path == "plain" else None
                labels = self.label[None] if path == "guided" else None
                maps = tap_maps(
                    self.model, self.recipes[t], x, prompt, context, self.contexts, labels
                )
                for name, v in read_values(self.recipes[t], maps).items():
                    feats[str(FeatureKey(t, name))] = v
                    raw[str(FeatureKey(t, name))] = maps[name]
            out.append(feats)
            self.raw.append(raw)
        return out


def random_projections(taps, mode: StorageMode) -> dict[str, Projection] | None:
    """What `mode` fits (a PCA store's basis), fitted on random pixels: the reading and decoding
    cost does not depend on which basis, and a 64x64 crop has too few pixels to fit 64
    components at the coarse strides."""
    rng = np.random.default_rng(0)
    return mode.fit(
        lambda: {
            tp.name: rng.standard_normal((2 * tp.channels, tp.channels), dtype=np.float32)
            for tp in taps
        }
    )


def write_store(online: Online, taps, setting: Setting, hw, tmp: Path, storage: str):
    """One store per timestep of ROWS draws (variant 0 plain, 1 guided): row 0 the online
    draw's maps, the others random maps of the same shapes, all stored as `storage`."""
    views = len(online.raw)
    prompts = ("", GUIDED_DIFF_PROMPT)[:views]
    mode = parse_storage(storage)
    gen = torch.Generator().manual_seed(1)
    paths = []
    for t in setting.timesteps:
        shapes = {tp.name: (tp.channels, hw[0] // tp.stride, hw[1] // tp.stride) for tp in taps}
        ident = StoreIdentity(
            "cost",
            tuple(shapes),
            tuple(tp.module_path for tp in taps),
            t,
            0,
            "add",
            "",
            "diff",
            "{}",
            "cost",
            hw,
            prompts,
            1,
            storage,
            "fp32",
            "none",
        )
        proj = online.recipes[t].projections
        path = tmp / f"t{t}"
        store = FeatureStore.create(
            path,
            ident,
            ROWS,
            shapes,
            {tp.name: tp.stride for tp in taps},
            16,
            None if proj is None else {n: (c.numpy(), m.numpy()) for n, (c, m) in proj.items()},
        )
        for shard in range(store.n_shards):
            arrays: dict[str, dict[str, np.ndarray]] = {}  # {values or a part: {tap: array}}
            for tp in taps:
                key = str(FeatureKey(t, tp.name))
                p = None if proj is None else proj[tp.name]
                stored = mode.reduce(torch.randn(16 * views, *shapes[tp.name], generator=gen), p)
                if shard == 0:  # each view stored as the online arm computes it (alone)
                    for i, r in enumerate(online.raw):
                        for name, x in mode.reduce(r[key], p).items():
                            stored[name][i] = x[0]
                for name, x in stored.items():
                    arrays.setdefault(name, {})[tp.name] = x.numpy().reshape(
                        16, views, *x.shape[1:]
                    )
            store.write_shard(shard, arrays.pop("values"), **arrays)
        paths.append(path)
    return paths


class Draws(Dataset):
    """The cached arm's samples: a row's views stacked, as the training DataLoader reads them."""

    def __init__(self, reader: FeatureReader, views: int) -> None:
        self.reader, self.views = reader, views

    def __len__(self) -> int:
        return self.reader.n_rows

    def __getitem__(self, row: int) -> Sample:
        views = [self.reader.features(row, v) for v in range(self.views)]
        return Sample({k: stack([v[k] for v in views]) for k in views[0]}, torch.zeros(1), row)


def cached_views(batch: Sample, device: str, n: int) -> list[dict[str, torch.Tensor]]:
    """A batch of one row's views, decoded on `device`, as the head step takes them."""
    feats = to_device(batch.features, device)
    return [{k: x[:, v] for k, x in feats.items()} for v in range(n)]


class Head:
    """The recipe head's training step on a batch of views (B = 1, V views)."""

    def __init__(self, cfg: TrainConfig, specs: dict, hw: tuple[int, int], device: str) -> None:
        torch.manual_seed(0)
        self.cfg, self.device = cfg, device
        self.model = build_model(cfg, specs).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.01)
        self.label = torch.randint(0, 19, (1, *hw), device=device)

    def step(self, views: list[dict[str, torch.Tensor]]) -> None:
        keys = self.model.input_specs
        feats = {
            k: torch.stack([v[k] for v in views], 1).to(self.device, torch.float32) for k in keys
        }
        loss, _ = views_loss(self.model, feats, self.label, self.cfg.view_loss())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    arms: dict[str, Callable[[], None]],
    repeats: int,
    iterations: int,
    device: str,
    before: dict[str, Callable[[], None]] | None = None,
):
    """Per arm: per-iteration seconds of each round, the arms taking turns; `before[arm]` runs
    untimed before each of its rounds (the cached arm drops the page cache)."""
    rounds: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            (before or {}).get(name, lambda: None)()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iterations):
                fn()
            sync(device)
            rounds[name].append((time.perf_counter() - t0) / iterations)
    return {
        k: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "max_s": max(v),
            "rounds_s": [round(x, 4) for x in v],
        }
        for k, v in rounds.items()
    }


def derived_h100(model: DiffusionModel, taps, cfg: TrainConfig, passes: dict[str, float]) -> dict:
    """DERIVED, not measured: H100 seconds per iteration at 512x512 from counted FLOPs at 40 %
    of its bf16 dense peak, with each setting's measured number of UNet passes."""
    flop_s = H100_BF16_DENSE_TFLOPS * 1e12 * UTILIZATION
    with torch.device("meta"), torch.no_grad():
        unet = type(model.unet).from_config(model.unet.config)
        lat = torch.zeros(1, 4, 64, 64)
        unet_f = count(lambda: unet(lat, torch.tensor([50]), torch.zeros(1, 77, 1024)))
        vae = type(model.vae).from_config(model.vae.config)
        vae_f = count(lambda: vae.encode(torch.zeros(1, 3, 512, 512)))
        out = {
            "note": "derived from counted FLOPs, not measured",
            "utilization": UTILIZATION,
            "unet_pass_gflop": unet_f / 1e9,
            "vae_encode_gflop": vae_f / 1e9,
        }
        for s in SETTINGS:
            specs = diff_inputs(
                cfg,
                {
                    str(FeatureKey(t, tp.name)): (tp.channels, tp.stride)
                    for t in s.timesteps
                    for tp in taps
                },
            )
            head = build_model(cfg, specs)
            feats = {k: torch.zeros(1, c, 512 // st, 512 // st) for k, (c, st) in specs.items()}
            head_f = 3 * count(lambda head=head, feats=feats: head(feats)) * (2 if s.guided else 1)
            online = (1 + s.guided) * vae_f + passes[s.name] * unet_f + head_f
            out[s.name] = {
                "online_s": online / flop_s,
                "cached_s": head_f / flop_s,
                "online_over_cached": online / head_f,
            }
    return out


def measure(
    s: Setting,
    model: DiffusionModel,
    taps: list,
    cfg: TrainConfig,
    hw: tuple[int, int],
    args: argparse.Namespace,
    projections: dict | None,
    counter: Counter,
    cold: bool,
    tmp: Path,
    run: Run,
) -> dict:
    """One setting: its store written and checked against the online path, then the online and
    cached iterations interleaved; their timings, passes and bytes."""
    cfg_s = dataclasses.replace(cfg, guided_weight=1.0 if s.guided else 0.0)
    online = Online(model, taps, s, hw, args.storage, projections)
    counter.calls = counter.passes = 0
    views = online.views()
    passes, calls = counter.passes, counter.calls
    paths = write_store(online, taps, s, hw, tmp / s.name, args.storage)
    specs = diff_inputs(cfg_s, {k: (v.shape[1], hw[0] // v.shape[-2]) for k, v in views[0].items()})
    reader = FeatureReader(
        paths,
        encoded_dir=str(tmp),
        set_name="",
        keys=list(specs),
        labels=False,
        threads=RECIPE["loader"]["read_threads"],
    )
    n_views = len(views)
    draws = Draws(reader, n_views)
    # Random rows, cold: what streamed training reads (a row and its views a sample).
    sampler = RandomSampler(
        draws, replacement=True, num_samples=10**6, generator=torch.Generator().manual_seed(0)
    )
    batches = iter(
        data_loader(
            draws, args.device, args.workers, 2, batch_size=1, sampler=sampler, collate_fn=collate
        )
    )
    cached = cached_views(collate([draws[0]]), args.device, n_views)
    # Equal but for float32 rounding: the online values of an int8 mode are the exact ones plus
    # a straight-through (decoded - exact), one rounding away from decoded.
    diff = max(
        (
            (cached[i][k].float() - views[i][k].float()).abs().max() / (1 + views[i][k].abs().max())
        ).item()
        for i in range(n_views)
        for k in specs
    )
    run.check(
        diff < 1e-5,  # an int8 step is 1/127 of the max: far above
        f"{s.name}: the store does not hold what the online path computes",
        {"max_relative_difference": diff},
    )
    heads = {
        "online": Head(cfg_s, specs, hw, args.device),
        "cached": Head(cfg_s, specs, hw, args.device),
    }
    reads: list[float] = []

    def online_step() -> None:
        online.draw += 1  # a fresh draw every iteration, as DIFF's
        heads["online"].step(online.views())

    def cached_step() -> None:
        t0 = time.perf_counter()
        views_read = cached_views(next(batches), args.device, n_views)
        sync(args.device)
        reads.append(time.perf_counter() - t0)
        heads["cached"].step(views_read)

    for head in heads.values():
        head.step(views)  # warm-up
    t = interleaved(
        {"online": online_step, "cached": cached_step},
        s.rounds,
        s.iterations,
        args.device,
        before={"cached": drop_page_cache} if cold else None,
    )
    t["ratio_of_medians"] = t["online"]["median_s"] / t["cached"]["median_s"]
    # The cached iteration's read (cold, random, decoded on the device) on its own.
    t["cached"]["read_median_s"] = statistics.median(reads)
    t["cached"]["read_cold"] = cold
    t["unet_calls_per_iteration"] = calls
    t["unet_passes_per_iteration"] = passes
    t["views"] = n_views
    t["rounds"], t["iterations_per_round"] = s.rounds, s.iterations
    t["stored_bytes_per_draw"] = (
        sum(p.stat().st_size for path in paths for p in path.rglob("*") if p.is_file()) // ROWS
    )
    return t


def sweep_of(results: dict) -> dict:
    """The sweep of 8 head experiments, from the measured per-iteration times: extracting a draw
    costs what the online arm spends on features (its iteration minus the head step, which is
    the cached iteration minus its read). The cache pays from `break_even` head iterations over
    all experiments together: extraction / (online - cached) per iteration."""
    sweep = {}
    for name, r in results.items():
        on, ca = r["online"]["median_s"], r["cached"]["median_s"]
        features = on - (ca - r["cached"]["read_median_s"])
        extraction = GTA5_IMAGES * DRAWS * features
        sweep[name] = {
            "extraction_hours": extraction / 3600,
            "break_even_head_iterations": round(extraction / (on - ca)),
            **{
                f"{it // 1000}k_iterations": {
                    "cached_hours": (extraction + 8 * it * ca) / 3600,
                    "online_hours": 8 * it * on / 3600,
                    "online_over_cached": 8 * it * on / (extraction + 8 * it * ca),
                }
                for it in (40000, 4000)
            },
        }
    return sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, nargs=2, default=[64, 64], help="crop (H, W)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--storage", default=RECIPE["extract"]["storage"])
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers of the cached arm")
    args = ap.parse_args()
    run = Run()
    torch.set_num_threads(args.threads)
    dtype = "fp16" if args.device.startswith("cuda") else "fp32"
    model = load_diffusion_model(random_sd21_folder(SD21), dtype, args.device)
    taps = resolve_taps(model.unet, "diff", model.vae_stride)
    hw = tuple(args.res)
    cfg = read_group(
        {**PARAMS, "train": {**PARAMS["train"], **RECIPE["train"]}}, "train", TrainConfig
    )
    counter = Counter(model.unet)
    mode = parse_storage(args.storage)
    projections = random_projections(taps, mode)
    cold = drop_page_cache()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in SETTINGS:
            print(f"{s.name} ...", flush=True)
            t = measure(s, model, taps, cfg, hw, args, projections, counter, cold, Path(tmp), run)
            results[s.name] = t
            print(
                f"{s.name}: online {t['online']['median_s']:.2f} s, cached "
                f"{t['cached']['median_s']:.3f} s, {t['ratio_of_medians']:.1f}x",
                flush=True,
            )
    for s in SETTINGS:
        run.check(
            results[s.name]["ratio_of_medians"] > 1, f"{s.name}: online not slower", results[s.name]
        )
    med = {k: v["online"]["median_s"] for k, v in results.items()}
    run.check(
        med["T1"] < med["T9"] < med["T9_guided"] < med["diff_inversion_every_iteration"],
        "online cost does not grow with timesteps, paths and the inversion",
        med,
    )
    passes = {k: v["unet_passes_per_iteration"] for k, v in results.items()}
    run.write(
        RESULTS,
        {
            "settings": {
                **vars(args),
                "crop": list(hw),
                "timesteps_9": T9,
                "dtype": dtype,
                "store_rows": ROWS,
                "page_cache_dropped_before_cached_rounds": cold,
            },
            "measured": results,
            "sweep_8_experiments_from_measured": {
                "gta5_images": GTA5_IMAGES,
                "draws": DRAWS,
                **sweep_of(results),
                "note": "8 x iterations x per-iteration seconds; the cache adds one extraction of "
                "every draw, priced at the online arm's feature seconds (its iteration minus "
                "the head step: the cached iteration minus its read)",
            },
            "derived_h100_512x512": derived_h100(model, taps, cfg, passes),
        },
    )


if __name__ == "__main__":
    main()
