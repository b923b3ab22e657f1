"""The prepare loop: generate or convert every dataset of `data`, then write manifests and a plot."""

from __future__ import annotations

import time

from pipeline.core.fileio import atomic_path
from pipeline.data.datasets import DataConfig, check_destinations, prepare_domain
from pipeline.data.manifest import write_manifest
from pipeline.reporting.plots import plot_class_frequencies


def run(cfg: DataConfig, datasets_dir: str, manifests_dir: str, plot: str) -> None:
    """Every domain prepared and checked before the first manifest is written."""
    start = time.perf_counter()
    check_destinations(cfg, datasets_dir)
    prepared = [prepare_domain(cfg.source, cfg.source_name, "source", cfg.synthetic, datasets_dir)]
    for name, entry in cfg.targets.items():
        prepared.append(prepare_domain(entry, name, "target", cfg.synthetic, datasets_dir))
    with atomic_path(manifests_dir) as tmp:
        tmp.mkdir()
        for domain in prepared:
            write_manifest(domain.frame, tmp / f"{domain.domain}.parquet")
    plot_class_frequencies({d.domain: d.class_counts for d in prepared}, plot)
    n = sum(len(d.frame) for d in prepared)
    print(f"prepare: {n} images in {len(prepared)} domains, {time.perf_counter() - start:.1f} s")
