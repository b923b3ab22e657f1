"""Cold random reads of DIFF's recipe's training samples at 512x512 from stores bigger than RAM,
through the training DataLoader, against this disk's raw random reads of the same sizes.

Per layout (`name=<commit>`: that commit's writer and reader, from a `git worktree` under
`.bench/`; `name=.`: the work tree) the real writer fills DIFF's recipe's stores of one crop
set: nine timesteps, SD-2.1's 21 diff taps at a 512x512 crop, `pca-64-int8`, two prompt
variants (plain, guided) x K = 2 draws, random values (a UNet's would read the same), with
`--images` rows each so that the nine together exceed this machine's RAM. A training sample is
what train reads for one pick of the recipe: both views (the plain and the guided variant of
one draw) of the 18 taps the finecoder reads (strides 8, 16, 32) at every timestep, and the
draw's 512x512 label, through `ViewsDataset` over a `FeatureReader` in a DataLoader with the
recipe's `loader` group (workers, prefetch, read_threads). Rounds alternate the layouts; before
every read the page cache is dropped (root), and each round reads distinct random picks, so
every read is cold.

The raw rate: in the same rounds, random `pread`s of exactly the sizes and count the layout's
reader issues per sample (every values and scales chunk, and the label), at random offsets in
the same files, with as many threads as the loader has readers, no decoding: what the disk
gives at that read size. Reported: samples/s (median, min-max) and loader / raw.

Checks: the stores exceed RAM; every sample read holds the values written for it (one row per
round compared against the writer's draw). A failed check exits 1 and writes nothing.

    python benchmarks/recipe_reads.py --layouts before=38131a4 layout=dccd3a2:after after=.
        # ~60 GB, ~15 min: dccd3a2's reader on the stores the work tree wrote (one format)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

RESULTS = Path(__file__).resolve().parent / "results" / "recipe_reads.json"
TIMESTEPS = [91, 52, 30, 22, 18, 14, 11, 7, 3]  # the recipe's
CROP = (512, 512)
STORAGE, K, PROMPTS = "pca-64-int8", 2, ("", "<guided>")
SET = "gta5-crops"


# ---- the worker: runs under the measured commit's `pipeline` (PYTHONPATH) ------------------


def worker_build(
    work: Path, images: int, crop: tuple[int, int] = CROP, storage: str = STORAGE, toy: bool = False
) -> dict[str, Any]:
    """The stores and labels, written by this code's FeatureStore (its layout and shard size);
    `toy`: a small SD-family model's taps (gpu_bench.py --toy)."""
    import numpy as np

    from pipeline.cache.encoded import LABELS_NAME, create_rows_array
    from pipeline.cache.storage import parse_storage
    from pipeline.cache.store import FeatureStore, StoreIdentity
    from pipeline.core.params import apply_recipe, load_params, read_group
    from pipeline.diffusion.build import ModelConfig, model_architecture, sd21_architecture
    from pipeline.diffusion.taps import resolve_taps
    from pipeline.loops.extract import ExtractConfig

    cfg = read_group(
        apply_recipe(load_params("params.yaml"), load_params("recipes/diff-gta2cs.yaml")),
        "extract",
        ExtractConfig,
    )
    params = load_params("params.yaml")
    model = (
        model_architecture(read_group(params, "model", ModelConfig)) if toy else sd21_architecture()
    )
    taps = resolve_taps(model.unet, "diff", model.vae_stride)
    shapes = {t.name: (t.channels, crop[0] // t.stride, crop[1] // t.stride) for t in taps}
    strides = {t.name: t.stride for t in taps}
    V, k = len(PROMPTS) * K, parse_storage(storage).k
    try:  # the layout's own shard size: by bytes (format 4), else a fixed image count
        from pipeline.cache.store import StoreLayout

        ips = StoreLayout.sized(
            images, V, shapes, strides, storage, cfg.shard_mb, cfg.batch_size
        ).images_per_shard
    except ImportError:
        ips = cfg.images_per_shard
    rng = np.random.default_rng(0)
    proj = {
        t: (rng.standard_normal((k, c)).astype(np.float32), np.zeros(c, np.float32))
        for t, (c, _, _) in shapes.items()
    }
    labels = create_rows_array(
        work / "encoded" / SET / LABELS_NAME, (images, K, *crop), "uint8", {}
    )
    labels[:] = rng.integers(0, 19, labels.shape, dtype=np.uint8)
    written = 0
    t0 = time.perf_counter()
    for t in TIMESTEPS:
        ident = StoreIdentity(
            "bench", tuple(shapes), tuple(f"up.{n}" for n in shapes), t, 0, "trajectory", "x",
            "diff", "{}", "bench", crop, PROMPTS, K, storage, "fp16", "none",
        )  # fmt: skip
        store = FeatureStore.create(work / f"t{t}" / SET, ident, images, shapes, strides, ips, proj)
        for shard in range(store.n_shards):
            s0, s1 = store.shard_range(shard)
            gen = np.random.default_rng([t, shard])
            values = {
                n: gen.integers(-127, 128, (s1 - s0, V, k, h, w), dtype=np.int8)
                for n, (_, h, w) in shapes.items()
            }
            scales = {n: gen.random((s1 - s0, V, k), dtype=np.float32) for n in shapes}
            store.write_shard(shard, values, scales=scales)
            written += sum(v.nbytes for v in values.values())
    seconds = time.perf_counter() - t0
    files = sum(1 for p in work.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
    return {
        "images_per_shard": ips,
        "files": files,
        "bytes": size,
        "write_MB_s": written / seconds / 1e6,
    }


def worker_read(work: Path, picks: list[list[int]], loader: dict[str, int]) -> dict[str, Any]:
    """Read `picks` ([row, draw]) through the training DataLoader: samples/s, bytes a sample,
    and whether the first pick holds the values written for it."""
    import numpy as np

    from pipeline.cache.reader import FeatureReader
    from pipeline.cache.store import FeatureStore
    from pipeline.core.device import data_loader
    from pipeline.core.names import FeatureKey
    from pipeline.data.samples import Pick, ViewsDataset, collate

    paths = [work / f"t{t}" / SET for t in TIMESTEPS]
    first = FeatureStore.open(paths[0])
    taps = [n for n in first.taps if first.tap_info[n]["stride"] < 64]  # the finecoder's 18
    keys = [str(FeatureKey(t, n)) for t in TIMESTEPS for n in taps]
    reader = FeatureReader(
        paths, encoded_dir=work / "encoded", set_name=SET, keys=keys, threads=loader["read_threads"]
    )
    batches = [[Pick(row, draw, (draw, K + draw))] for row, draw in picks]  # plain, guided
    dl = data_loader(
        ViewsDataset(reader, None), "cpu", loader["workers"], loader["prefetch"],
        batch_sampler=batches, collate_fn=collate,
    )  # fmt: skip
    t0 = time.perf_counter()
    got, nbytes, ok = 0, 0, False
    for i, sample in enumerate(dl):
        got += 1
        nbytes += sum(v.values.numel() + v.scales.numel() * 4 for v in sample.features.values())
        if i == 0:  # the first pick's plain view of one tap: what the writer wrote there
            row, draw = picks[0]
            x = sample.features[keys[0]]
            want = first.read(taps[0], row, draw, decode=False)
            ok = np.array_equal(x.values[0, 0].numpy(), want[0])
            ok = ok and np.array_equal(x.scales[0, 0].numpy(), want[1])
    seconds = time.perf_counter() - t0
    return {
        "samples": got,
        "seconds": seconds,
        "samples_s": got / seconds,
        "MB_per_sample": nbytes / got / 1e6,
        "checked": bool(ok),
    }


def read_plan(work: Path) -> tuple[list[tuple[list[str], int]], int]:
    """The reads this layout's reader issues for one sample: (the files they may fall in, the
    size) per read, and how many there are."""
    from pipeline.cache.store import FeatureStore

    store = FeatureStore.open(work / f"t{TIMESTEPS[0]}" / SET)
    reads: list[tuple[list[str], int]] = []
    for name in store.array_names():
        node = name.split("/")[1]  # a tap's own array (format 3) or its group's (format 4)
        held = [t for t in store.taps if node in (t, store.tap_info[t].get("group"))]
        if not any(store.tap_info[t]["stride"] < 64 for t in held):
            continue
        arr = store.array_files(name)
        size = arr.chunk_bytes + 4 * arr.checksum
        for t in TIMESTEPS:
            folder = work / f"t{t}" / SET / name
            files = [str(p) for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json"]
            reads += [(files, size)] * 2  # both views
    labels = [
        p
        for p in (work / "encoded" / SET / "labels.zarr").rglob("*")
        if p.name != "zarr.json" and p.is_file()
    ]
    per_label = sum(p.stat().st_size for p in labels) // (store.n_images * K)
    reads.append(([str(p) for p in labels], per_label))
    return reads, len(reads)


def worker_raw(work: Path, samples: int, threads: int) -> dict[str, Any]:
    """`samples` samples' worth of preads of this layout's read sizes at random offsets of the
    same files, `threads` at a time, cold, nothing decoded."""
    plan, per_sample = read_plan(work)
    rng = random.Random(1)
    sizes = {f: os.stat(f).st_size for files, _ in plan for f in files}
    jobs = []
    for _ in range(samples):
        for files, size in plan:
            path = rng.choice(files)
            jobs.append((path, rng.randrange(0, max(1, sizes[path] - size)) // 4096 * 4096, size))

    def read(job: tuple[str, int, int]) -> int:
        path, offset, size = job
        fd = os.open(path, os.O_RDONLY)
        try:
            return len(os.pread(fd, size, offset))
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, jobs))
    seconds = time.perf_counter() - t0
    return {
        "samples_s": samples / seconds,
        "MB_s": total / seconds / 1e6,
        "reads_per_sample": per_sample,
    }


# ---- the driver ----------------------------------------------------------------------------


def call(tree: Path, mode: str, **kw: Any) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    arg = json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in kw.items()})
    out = subprocess.run(
        [sys.executable, __file__, "--worker", mode, arg],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(f"{mode} in {tree}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kw = json.loads(sys.argv[3])
        fn = {"build": worker_build, "read": worker_read, "raw": worker_raw}[sys.argv[2]]
        kw["work"] = Path(kw["work"])
        print(json.dumps(fn(**kw)))
        return
    # The driver's only: a worker runs under another commit's `pipeline`, which may lack it.
    from pipeline.reporting.machine import Run, drop_page_cache

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=["after=."], metavar="NAME=REV")
    ap.add_argument("--images", type=int, default=400, help="rows of each of the nine stores")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=24, help="distinct random picks a round")
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "recipe_reads")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the stores for another run")
    ap.add_argument("--min-gb", type=float, help="the stores' least size (default: this RAM)")
    args = ap.parse_args()
    run = Run()
    import yaml

    loader = yaml.safe_load((ROOT / "recipes" / "diff-gta2cs.yaml").read_text())["loader"]
    loader = {k: int(loader[k]) for k in ("workers", "prefetch", "read_threads")}
    specs = dict(item.split("=", 1) for item in args.layouts)
    # name=<rev>:<other>: that code reads the stores layout <other> wrote (the same format), so
    # two readers of one format cost one set of stores on disk.
    layouts = {n: spec.split(":")[0] for n, spec in specs.items()}
    stores_of = {n: spec.split(":")[1] if ":" in spec else n for n, spec in specs.items()}
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    trees, built = {}, {}
    for name, rev in sorted(layouts.items(), key=lambda x: stores_of[x[0]] != x[0]):
        tree = ROOT
        if rev != ".":
            tree = args.work / "trees" / name
            if not tree.exists():
                subprocess.run(
                    ["git", "worktree", "add", "--detach", "-f", str(tree), rev],
                    cwd=ROOT,
                    check=True,
                )
        trees[name] = tree
        work = args.work / stores_of[name]
        if not (work / "built.json").exists():
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            print(f"{name}: writing the stores", flush=True)
            (work / "built.json").write_text(
                json.dumps(call(tree, "build", work=work, images=args.images))
            )
        built[name] = json.loads((work / "built.json").read_text())
        least = ram if args.min_gb is None else args.min_gb * 1e9
        run.check(
            built[name]["bytes"] > least, f"{name}: the stores do not exceed RAM", built[name]
        )
        print(f"{name}: {built[name]}", flush=True)
    rng = random.Random(0)
    cold = drop_page_cache()
    run.check(cold, "the page cache cannot be dropped (run as root)")
    got: dict[str, dict[str, list]] = {n: {"loader": [], "raw": [], "checked": []} for n in layouts}
    all_picks = [(r, d) for r in range(args.images) for d in range(K)]
    for r in range(args.rounds):
        picks = rng.sample(all_picks, args.samples)
        for name in layouts:
            work = args.work / stores_of[name]
            drop_page_cache()
            one = call(trees[name], "read", work=work, picks=picks, loader=loader)
            drop_page_cache()
            raw = call(
                trees[name],
                "raw",
                work=work,
                samples=args.samples,
                threads=loader["workers"] * loader["read_threads"],
            )
            got[name]["loader"].append(one)
            got[name]["raw"].append(raw)
            print(
                f"round {r} {name}: loader {one['samples_s']:.2f}/s, raw {raw['samples_s']:.2f}/s",
                flush=True,
            )
    results: dict[str, Any] = {
        "images": args.images,
        "timesteps": TIMESTEPS,
        "storage": STORAGE,
        "crop": CROP,
        "loader": loader,
        "ram_bytes": ram,
        "layouts": {},
    }
    for name, rev in layouts.items():
        loads = [g["samples_s"] for g in got[name]["loader"]]
        raws = [g["samples_s"] for g in got[name]["raw"]]
        run.check(
            all(g["checked"] for g in got[name]["loader"]),
            f"{name}: a sample read other values than written",
        )
        results["layouts"][name] = {
            "rev": rev if rev != "." else run.commit,
            "stores_of": stores_of[name],
            **built[name],
            "MB_per_sample": got[name]["loader"][0]["MB_per_sample"],
            "reads_per_sample": got[name]["raw"][0]["reads_per_sample"],
            "loader_samples_s": summary(loads),
            "raw_samples_s": summary(raws),
            "raw_MB_s": summary([g["MB_s"] for g in got[name]["raw"]]),
            "loader_over_raw": summary([a / b for a, b in zip(loads, raws, strict=True)]),
        }
    run.write(args.out, results)
    if not args.keep:
        for name in layouts:
            shutil.rmtree(args.work / name, ignore_errors=True)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "all": [round(v, 3) for v in values],
    }


if __name__ == "__main__":
    main()
