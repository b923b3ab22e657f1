"""DVC stage extract@<t>: UNet features at one timestep -> one store per encoded set.

Writes <features>/t<t>/<set>/, <features>/digests/t<t>.json and <metrics>/t<t>.json. Runs alone, under torchrun (one node or
several: each rank writes its own shards of the same stores) or as the tasks of a Slurm job
array after one run with --create-only (docs/scale.md).
"""

from pathlib import Path

from _stage import parse

from pipeline.cache.store import digest_path, timestep_dir
from pipeline.core.errors import run_stage
from pipeline.core.params import read_group, timestep_argument
from pipeline.diffusion.build import ModelConfig
from pipeline.loops import cleandift, extract


def main() -> None:
    args, params = parse(
        __doc__,
        "encoded",
        "trajectories",
        "model",
        "features",
        "metrics",
        switches={
            "--replace-stale": "delete stores of other settings (DVC's cache keeps them)",
            "--create-only": "create (or ready to resume) every store, compute nothing",
        },
        options={"--timestep": "one of params.yaml's timesteps"},
    )
    timestep = timestep_argument(args.timestep, params, args.params)
    model = read_group(params, "model", ModelConfig)
    cleandift.check_unet_source(model.unet, read_group(params, "cleandift.steps", int))
    extract.run(
        read_group(params, "extract", extract.ExtractConfig),
        model,
        timestep,
        args.encoded,
        args.trajectories,
        args.model,
        str(timestep_dir(args.features, timestep)),
        str(Path(args.metrics) / f"t{timestep}.json"),
        args.replace_stale,
        args.create_only,
        str(digest_path(args.features, timestep)),
    )


if __name__ == "__main__":
    run_stage("extract", main)
