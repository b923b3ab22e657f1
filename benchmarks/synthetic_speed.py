"""Benchmark: synthetic scenes (layout + rendering) per second at 256x512 on one core.

Usage: python benchmarks/synthetic_speed.py [--images 60] [--out benchmarks/results/synthetic_speed.json]
Numpy is pinned to one thread; per domain the median of five rounds with the min-max (the CPU
may be shared: the load before and after is recorded).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from pipeline.data.synthetic import DOMAINS, SceneGenerator  # noqa: E402
from pipeline.reporting.machine import Run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=60, help="images per domain per round")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results/synthetic_speed.json")
    args = ap.parse_args()
    run = Run()
    gen = SceneGenerator(args.height, args.width, seed=0)
    gen.sample(0, "game")  # warm-up
    per_domain: dict[str, dict[str, float]] = {}
    for domain in DOMAINS:
        rates = []
        for _ in range(5):
            start = time.perf_counter()
            for i in range(args.images):
                gen.sample(i, domain, "train")
            rates.append(args.images / (time.perf_counter() - start))
        per_domain[domain] = {
            "median": round(statistics.median(rates), 1),
            "min": round(min(rates), 1),
            "max": round(max(rates), 1),
        }
    # Mixed: the prepare workload (every domain, fresh layouts), wall and CPU time.
    wall, cpu = time.perf_counter(), time.process_time()
    n = 0
    for i in range(args.images):
        gen.sample(i, DOMAINS[i % len(DOMAINS)], "val")
        n += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {
        "benchmark": "synthetic scenes per second (layout + render, one core)",
        "resolution": [args.height, args.width],
        "images_per_second": per_domain,
        "mixed_domains_images_per_second": {"wall": round(n / wall, 1), "cpu": round(n / cpu, 1)},
        "slowest_domain_median": min(r["median"] for r in per_domain.values()),
        "numpy": np.__version__,
    }
    run.write(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
