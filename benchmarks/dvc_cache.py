"""DVC and the feature store at scale: hashing throughput, cache types, and what each risks.

After every `extract@t` DVC hashes each new file of the store (md5) and links or copies it into
its cache. In a scratch git + DVC repository this measures, for a store-like folder of random
bytes (`--gb` GB, i.e. shard files):
- `dvc commit` of the stage's output: seconds per GB by file size (the shard size, set by
  extract.images_per_shard) and by `core.checksum_jobs`, page cache cold (dropped, root only)
  and hot;
- per `cache.type` (copy, hardlink, symlink, reflink where the filesystem has it): commit time,
  disk used by workspace + cache together, checkout time after the output is deleted, and
  whether truncating a checked-out file in place (as root can, whatever the permissions)
  damages the cached copy and whether `dvc status` notices.

Usage: python benchmarks/dvc_cache.py [--gb 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.reporting.machine import Run, drop_page_cache

RESULTS = Path(__file__).resolve().parent / "results" / "dvc_cache.json"
STORE_BYTES_PER_IMAGE = 56.0e6  # SD-2.1 diff taps, 1024x512, fp16 (benchmarks/store_io.py)


def sh(args: list[str], cwd: Path) -> float:
    """Run a command; its wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def du_bytes(*paths: Path) -> int:
    """Disk blocks used by `paths` together, hard links counted once (as `du` does)."""
    out = subprocess.run(["du", "-scb", "--", *map(str, paths)], capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1].split()[0])


def repo(root: Path, cache_type: str, jobs: int) -> Path:
    """A git + DVC repository with one stage whose output is the store folder `out`."""
    root.mkdir(parents=True)
    sh(["git", "init", "-q"], root)
    sh(["dvc", "init", "-q"], root)
    sh(["dvc", "config", "cache.type", cache_type], root)
    sh(["dvc", "config", "core.checksum_jobs", str(jobs)], root)
    sh(["dvc", "config", "core.autostage", "false"], root)
    (root / "dvc.yaml").write_text(
        "stages:\n  extract:\n    cmd: 'true'\n    outs:\n      - out:\n          persist: true\n"
    )
    return root


def fill(folder: Path, total: int, file_size: int, seed: int = 0) -> int:
    """Random files of `file_size` bytes summing to ~`total`; how many."""
    rng = np.random.default_rng(seed)
    n = max(1, total // file_size)
    for i in range(n):
        path = folder / "c" / str(i // 256) / str(i % 256)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.bytes(file_size))
    return n


def hashing(tmp: Path, total: int, sizes: list[int], jobs: list[int]) -> list[dict]:
    """`dvc commit` seconds per GB (hardlink cache: the linking is free, the hash is not)."""
    rows = []
    for size in sizes:
        for j in jobs:
            for cache in ("hot", "cold"):
                root = repo(tmp / f"h{size}-{j}-{cache}", "hardlink", j)
                n = fill(root / "out", total, size)
                if cache == "cold" and not drop_page_cache():
                    continue
                sec = sh(["dvc", "commit", "-f", "-q", "extract"], root)
                rows.append(
                    {
                        "file_MB": size / 1e6,
                        "files": n,
                        "checksum_jobs": j,
                        "page_cache": cache,
                        "seconds_per_GB": round(sec / (n * size / 1e9), 2),
                    }
                )
                print(rows[-1], flush=True)
                sh(["rm", "-rf", str(root)], tmp)
    return rows


def cache_types(tmp: Path, total: int, size: int) -> dict:
    """Commit, disk, checkout and in-place-damage behaviour per cache.type."""
    out = {}
    for kind in ("copy", "hardlink", "symlink", "reflink"):
        root = repo(tmp / f"t-{kind}", kind, 2)
        n = fill(root / "out", total, size)
        data = n * size
        try:
            commit = sh(["dvc", "commit", "-f", "-q", "extract"], root)
        except RuntimeError as e:  # reflink on a filesystem without it
            out[kind] = {"supported": False, "error": str(e).splitlines()[-1][:200]}
            sh(["rm", "-rf", str(root)], tmp)
            continue
        used = du_bytes(root / "out", root / ".dvc" / "cache")
        sh(["rm", "-rf", "out"], root)
        try:
            checkout = sh(["dvc", "checkout", "-q"], root)
        except RuntimeError as e:  # reflink on a filesystem without it
            out[kind] = {"supported": False, "error": str(e).splitlines()[-1][:200]}
            sh(["rm", "-rf", str(root)], tmp)
            continue
        victim = next(p for p in sorted((root / "out").rglob("*")) if p.is_file())
        cached = victim.resolve() if victim.is_symlink() else victim
        before = subprocess.run(["md5sum", str(cached)], capture_output=True, text=True).stdout
        with open(victim, "r+b") as f:  # what a buggy writer (or root) does
            f.truncate(size // 2)
        cache_files = [p for p in (root / ".dvc" / "cache").rglob("*") if p.is_file()]
        damaged = any(
            subprocess.run(["md5sum", str(p)], capture_output=True, text=True).stdout.split()[0]
            != p.parent.name + p.name
            for p in cache_files
            if len(p.parent.name) == 2 and not p.name.endswith(".dir")
        )
        status = subprocess.run(["dvc", "status", "-q"], cwd=root, capture_output=True)
        # What `dvc repro` / `dvc checkout` then restore, and whether DVC calls it clean.
        subprocess.run(["dvc", "checkout", "-f", "-q"], cwd=root, capture_output=True)
        after = subprocess.run(["md5sum", str(victim)], capture_output=True, text=True).stdout
        clean = subprocess.run(["dvc", "status", "-q"], cwd=root, capture_output=True)
        out[kind] = {
            "supported": True,
            "commit_s_per_GB": round(commit / (data / 1e9), 2),
            "disk_used_over_data": round(used / data, 2),
            "checkout_s_per_GB": round(checkout / (data / 1e9), 2),
            "truncating_a_checked_out_file_damages_the_cache": damaged,
            "dvc_status_notices": status.returncode != 0,
            "checkout_restores_the_original": after.split()[0] == before.split()[0],
            "dvc_status_then_clean": clean.returncode == 0,
        }
        print(kind, out[kind], flush=True)
        sh(["rm", "-rf", str(root)], tmp)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of the store-like folder")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir on /tmp)")
    args = ap.parse_args()
    run = Run()
    total = int(args.gb * 1e9)
    cores = os.cpu_count() or 1
    jobs = sorted({1, 2, max(1, min(4, cores // 2))})
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        # Shard files: 4 images of the default (1.1 MB), 1 / 4 / 16 SD-2.1 images (56-900 MB).
        sizes = [1_100_000, 56_000_000, 224_000_000]
        rows = hashing(Path(tmp), total, sizes, jobs)
        types = cache_types(Path(tmp), total, 56_000_000)
    best = (
        min(r["seconds_per_GB"] for r in rows if r["page_cache"] == "cold")
        if any(r["page_cache"] == "cold" for r in rows)
        else min(r["seconds_per_GB"] for r in rows)
    )
    tb = 7.0  # GTA5 x 5 timesteps, fp16 (benchmarks/flops.py)
    out = {
        "settings": vars(args),
        "dvc_default_checksum_jobs_here": max(1, min(4, cores // 2)),
        "hashing": rows,
        "cache_types": types,
        "extrapolation": {
            "gta5_5_timesteps_fp16_TB": tb,
            "hours_to_hash_here_best": round(tb * 1e3 * best / 3600, 2),
            "note": "md5 is one core per checksum job; a 16-core host hashes with up to 16 jobs "
            "(core.checksum_jobs) until the disk, not the CPU, limits",
        },
    }
    run.write(RESULTS, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
