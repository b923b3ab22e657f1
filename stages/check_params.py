"""DVC stage check_params: every params group validated, and what only a later stage could
refuse checked now, before DVC removes anything downstream (every stage depends on this one).

The checks are pipeline/plan/checks.py's. Writes `out`, whose content never changes: valid
params re-run nothing downstream.
"""

from _stage import parse

from pipeline.core.errors import run_stage
from pipeline.core.fileio import atomic_path
from pipeline.plan.checks import check_all


def main() -> None:
    args, params = parse(__doc__, "out")
    check_all(params, args.params)
    with atomic_path(args.out) as tmp:
        tmp.write_text("params.yaml checked\n")


if __name__ == "__main__":
    run_stage("check_params", main)
