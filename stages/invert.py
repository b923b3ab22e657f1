"""DVC stage invert: DIFF's DDIM-inversion trajectory of every image and draw (a noise mode
that inverts: trajectory); a note under the others."""

from _stage import parse

from pipeline.core.errors import run_stage
from pipeline.core.params import read_group
from pipeline.diffusion.build import ModelConfig
from pipeline.loops import invert


def main() -> None:
    args, params = parse(__doc__, "encoded", "model", "out", "metrics")
    invert.run(
        read_group(params, "invert", invert.InvertConfig),
        read_group(params, "extract.noise_mode", str),
        read_group(params, "model", ModelConfig),
        args.encoded,
        args.model,
        args.out,
        args.metrics,
    )


if __name__ == "__main__":
    run_stage("invert", main)
