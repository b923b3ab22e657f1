"""DVC stage build_model: the small SD-family model (random init), or a pointer to a local folder."""

from _stage import parse

from pipeline.core.errors import run_stage
from pipeline.core.params import read_group
from pipeline.diffusion.build import ModelConfig, build_model_folder


def main() -> None:
    args, params = parse(__doc__, "out")
    build_model_folder(
        read_group(params, "model", ModelConfig), read_group(params, "seed", int), args.out
    )


if __name__ == "__main__":
    run_stage("build_model", main)
