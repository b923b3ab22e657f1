"""DVC stage evaluate: per-domain scores of the trained head, with per-class plots and overlays."""

from _stage import parse

from pipeline.cache.preload import LoaderConfig
from pipeline.core.errors import run_stage
from pipeline.core.params import read_group, read_timesteps
from pipeline.loops import evaluate


def main() -> None:
    args, params = parse(
        __doc__, "encoded", "features", "heads", "results", "metrics", "plots", "predictions"
    )
    evaluate.run(
        read_group(params, "evaluate", evaluate.EvalConfig),
        read_group(params, "loader", LoaderConfig),
        read_timesteps(params),
        args.encoded,
        args.features,
        args.heads,
        args.results,
        args.metrics,
        args.plots,
        args.predictions,
    )


if __name__ == "__main__":
    run_stage("evaluate", main)
