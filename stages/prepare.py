"""DVC stage prepare: generate or convert every dataset of `data`; manifests and a plot."""

from _stage import parse

from pipeline.core.errors import run_stage
from pipeline.core.params import read_group
from pipeline.data.datasets import DataConfig
from pipeline.loops import prepare


def main() -> None:
    args, params = parse(__doc__, "datasets", "manifests", "plot")
    prepare.run(read_group(params, "data", DataConfig), args.datasets, args.manifests, args.plot)


if __name__ == "__main__":
    run_stage("prepare", main)
