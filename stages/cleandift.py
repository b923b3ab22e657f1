"""DVC stage cleandift: CleanDIFT's fine-tuning of the UNet for clean one-pass features (off at steps 0)."""

from _stage import parse

from pipeline.core.errors import run_stage
from pipeline.core.params import read_group
from pipeline.diffusion.build import ModelConfig
from pipeline.loops import cleandift


def main() -> None:
    args, params = parse(__doc__, "model", "encoded", "out", "metrics")
    cleandift.run(
        read_group(params, "cleandift", cleandift.CleanDiftConfig),
        read_group(params, "model", ModelConfig),
        args.model,
        args.encoded,
        args.out,
        args.metrics,
    )


if __name__ == "__main__":
    run_stage("cleandift", main)
