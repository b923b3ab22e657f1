"""Print a run's budget: per stage and set the images, draws, UNet passes, GPU-hours and bytes,
the DVC cache's extra bytes on this filesystem and the free disk.

    python -m pipeline.plan                                   # params.yaml as it stands
    python -m pipeline.plan --params recipes/diff-gta2cs.yaml --images gta5=24966 \\
        cityscapes=500 acdc=406 darkzurich=50                 # a recipe, its data not here

A recipe file is merged over params.yaml as `recipes/run.py` merges it. Exit 1 (one line) when
the outputs cannot fit the free disk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.params import apply_recipe, load_params, read_group
from pipeline.data.datasets import DataConfig
from pipeline.plan.budget import GUIDED_CLASSES, plan


def merged(params: Path, base: Path) -> dict:
    """`params` alone, or a recipe (a partial params file) over `base` as recipes/run.py
    applies it."""
    own = load_params(params)
    if params.resolve() == base.resolve() or not base.is_file():
        return own
    return apply_recipe(load_params(base), own)


def image_counts(items: list[str], data: DataConfig) -> dict[str, int]:
    """--images DOMAIN=N: a domain of the params (DOMAIN.val: a source's val split), N >= 0."""
    known = [data.source_name, f"{data.source_name}.val", *data.targets]
    counts = {}
    for item in items:
        domain, eq, n = item.partition("=")
        if not eq or not n.isdigit():
            raise ConfigError(f"--images {item}: expected DOMAIN=N with N a whole number >= 0")
        if domain not in known:
            raise ConfigError(f"--images {item}: {domain!r} is none of the domains {known}")
        counts[domain] = int(n)
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params.yaml, or a recipe over it")
    ap.add_argument(
        "--images",
        nargs="*",
        default=[],
        metavar="DOMAIN=N",
        help="image counts of datasets not on this machine (<domain>.val: a source's val split)",
    )
    ap.add_argument(
        "--guided-classes",
        type=float,
        help="DIFF's class prompts per training draw (the guided passes); default: counted "
        f"in data/encoded's labels where they hold the set, else {GUIDED_CLASSES}",
    )
    ap.add_argument("--pass-rate", type=float, help="measured UNet passes per second")
    args = ap.parse_args(argv)
    try:
        params = merged(Path(args.params), Path("params.yaml"))
        counts = image_counts(args.images, read_group(params, "data", DataConfig, args.params))
        budget = plan(params, counts, args.guided_classes, args.pass_rate, source=args.params)
        print(budget.table())
        budget.check_fits()
    except PipelineError as e:
        sys.exit(f"plan: error: {args.params}: {e}")


if __name__ == "__main__":
    main()
