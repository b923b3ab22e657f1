"""DVC stage `prepare`: generate or convert every dataset of `data`, write manifests and a plot.

Usage: python stages/prepare.py [--params params.yaml] [--datasets data/datasets]
       [--manifests data/manifests] [--plot plots/data/class_frequencies.png]
"""

from __future__ import annotations

import argparse
import time

import _checkout  # noqa: F401  (this checkout's pipeline/, see stages/_checkout.py)

from pipeline.class_frequencies import plot_class_frequencies
from pipeline.datasets import SyntheticConfig, parse_entry, prepare_domain
from pipeline.errors import DataError, run_stage
from pipeline.fileio import atomic_path
from pipeline.manifest import write_manifest
from pipeline.params import from_dict, load_params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--datasets", default="data/datasets", help="converted labels of real datasets")
    ap.add_argument("--manifests", default="data/manifests")
    ap.add_argument("--plot", default="plots/data/class_frequencies.png")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    data = load_params(args.params)["data"]
    synthetic = from_dict(SyntheticConfig, data.get("synthetic", {}))
    source = parse_entry(data["source"], "data.source")
    source_name = source.domain if source.kind == "synthetic" else source.kind
    targets = {name: parse_entry(v, f"data.targets.{name}") for name, v in data["targets"].items()}
    if source_name in targets:
        raise DataError(f"params data.targets: {source_name!r} is also the source domain's name")

    # Everything is prepared and checked before the first manifest is written.
    prepared = [prepare_domain(source, source_name, "source", synthetic, args.datasets)]
    for name, entry in targets.items():
        prepared.append(prepare_domain(entry, name, "target", synthetic, args.datasets))
    with atomic_path(args.manifests) as tmp:
        tmp.mkdir()
        for domain in prepared:
            write_manifest(domain.frame, tmp / f"{domain.domain}.parquet")
    plot_class_frequencies({d.domain: d.class_counts for d in prepared}, args.plot)
    n = sum(len(d.frame) for d in prepared)
    print(f"prepare: {n} images in {len(prepared)} domains, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    run_stage("prepare", main)
