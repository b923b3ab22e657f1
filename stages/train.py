"""DVC stage train: fusion + head from the cached features (or from pixels).

`scratch` holds the checkpoints a killed run resumes from (not a DVC output: it is removed
once the head is saved)."""

import os
import sys

from _stage import parse

from pipeline.cache.preload import LoaderConfig
from pipeline.core.errors import run_stage
from pipeline.core.params import read_group, read_timesteps
from pipeline.data.sampling import SamplingConfig
from pipeline.loops import train


def main() -> None:
    args, params = parse(
        __doc__, "encoded", "features", "out", "scratch", "metrics", "plots", "live"
    )
    cfg = read_group(params, "train", train.TrainConfig)
    if cfg.processes > 1 and "WORLD_SIZE" not in os.environ:
        # train.processes > 1: the same command, one rank per process (per GPU on CUDA).
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={cfg.processes}",
        ]
        os.execv(sys.executable, [*launcher, *sys.argv])
    train.run(
        cfg,
        read_group(params, "sampling", SamplingConfig),
        read_group(params, "loader", LoaderConfig),
        read_timesteps(params),
        args.encoded,
        args.features,
        args.out,
        args.scratch,
        args.metrics,
        args.plots,
        args.live,
    )


if __name__ == "__main__":
    run_stage("train", main)
