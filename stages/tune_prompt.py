"""DVC stage tune_prompt: learn the scene prompt per target domain (online UNet), score before/after."""

from _stage import parse

from pipeline.core.errors import run_stage
from pipeline.core.params import read_group
from pipeline.diffusion.build import ModelConfig
from pipeline.loops import tune_prompt


def main() -> None:
    args, params = parse(
        __doc__,
        "model",
        "heads",
        "encoded",
        "trajectories",
        "features",
        "out",
        "results",
        "metrics",
        "live",
    )
    cfg = read_group(params, "tune_prompt", tune_prompt.TuneConfig)
    model_cfg = read_group(params, "model", ModelConfig)
    tune_prompt.run(
        cfg,
        model_cfg,
        args.model,
        args.heads,
        args.encoded,
        args.trajectories,
        args.features,
        args.out,
        args.results,
        args.metrics,
        args.live,
    )


if __name__ == "__main__":
    run_stage("tune_prompt", main)
