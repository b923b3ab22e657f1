"""DVC stage report: a Markdown summary of the metrics, with the figures."""

from _stage import parse

from pipeline.core.errors import run_stage
from pipeline.loops import report


def main() -> None:
    args, _ = parse(__doc__, "metrics", "live", "plots", "out")
    report.run(args.metrics, args.live, args.plots, args.out)


if __name__ == "__main__":
    run_stage("report", main)
