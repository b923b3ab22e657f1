"""DVC stage encode: image index, VAE latents, resized labels and prompt embeddings."""

from _stage import parse

from pipeline.core.errors import run_stage
from pipeline.core.params import read_group
from pipeline.data.datasets import DataConfig
from pipeline.data.sampling import SamplingConfig
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.prompts import PromptConfig
from pipeline.loops import encode


def main() -> None:
    args, params = parse(__doc__, "manifests", "datasets", "model", "out", "metrics")
    encode.run(
        read_group(params, "encode", encode.EncodeConfig),
        read_group(params, "sampling", SamplingConfig),  # crop draws are cut here
        read_group(params, "prompts", PromptConfig),
        read_group(params, "data", DataConfig),
        read_group(params, "model", ModelConfig),
        args.manifests,
        args.datasets,
        args.model,
        args.out,
        args.metrics,
    )


if __name__ == "__main__":
    run_stage("encode", main)
