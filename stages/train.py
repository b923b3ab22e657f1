"""DVC stage train: fusion + head from the cached features (or from pixels)."""

from _stage import parse

from pipeline.cache.preload import LoaderConfig
from pipeline.core.errors import run_stage
from pipeline.core.params import read_group, read_timesteps
from pipeline.loops import train


def main() -> None:
    args, params = parse(__doc__, "encoded", "features", "out", "metrics", "plots")
    train.run(
        read_group(params, "train", train.TrainConfig),
        read_group(params, "loader", LoaderConfig),
        read_timesteps(params),
        args.encoded,
        args.features,
        args.out,
        "data/train_checkpoint",  # scratch for resuming a killed run; not a DVC output
        args.metrics,
        args.plots,
    )


if __name__ == "__main__":
    run_stage("train", main)
