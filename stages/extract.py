"""DVC stage extract@<t>: UNet features at one timestep -> one store per domain.

Runs alone or under torchrun (each rank writes its own shard-aligned part of the same store).
"""

from _stage import parse

from pipeline.core.errors import run_stage
from pipeline.core.params import Timestep, read_group, validate
from pipeline.diffusion.build import ModelConfig
from pipeline.loops import extract


def main() -> None:
    args, params = parse(
        __doc__,
        "timestep",
        "encoded",
        "trajectories",
        "model",
        "out",
        "metrics",
        switches={"--replace-stale": "delete stores of other settings (DVC's cache keeps them)"},
    )
    extract.run(
        read_group(params, "extract", extract.ExtractConfig),
        read_group(params, "model", ModelConfig),
        validate(args.timestep, Timestep, "timestep", "command line"),
        args.encoded,
        args.trajectories,
        args.model,
        args.out,
        args.metrics,
        args.replace_stale,
    )


if __name__ == "__main__":
    run_stage("extract", main)
