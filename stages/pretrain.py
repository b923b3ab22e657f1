"""DVC stage pretrain: the small model text-to-image on all domains' unlabeled images."""

from _stage import parse

from pipeline.core.errors import run_stage
from pipeline.core.params import read_group
from pipeline.data.datasets import SyntheticConfig
from pipeline.loops import pretrain


def main() -> None:
    args, params = parse(__doc__, "model_init", "manifests", "out", "metrics", "plots", "live")
    cfg = read_group(params, "pretrain", pretrain.PretrainConfig)
    synthetic = read_group(params, "data.synthetic", SyntheticConfig)
    pretrain.run(
        cfg,
        synthetic,
        args.model_init,
        args.manifests,
        args.out,
        args.metrics,
        args.plots,
        args.live,
    )


if __name__ == "__main__":
    run_stage("pretrain", main)
