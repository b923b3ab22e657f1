"""Run a recipe (recipes/<name>.yaml) as a named DVC experiment: `dvc exp show` lists it by name.

Usage: python recipes/run.py NAME [--queue] [--dry-run] [-- extra dvc exp run arguments]

The recipe's values replace params.yaml's (nested groups key by key; data.source and
data.targets whole) as `dvc exp run -S` overrides: the experiment's params.yaml is DVC's; this script never
writes the workspace's params.yaml or git's index (DVC writes the overrides into params.yaml
for a moment while it stashes the experiment, and writes the file back). Before DVC runs anything, the merged
params get the pipeline's own check (pipeline/plan/checks.py: every group, the devices, the
dataset roots and model folder exist): a recipe that cannot run stops with one line and
deletes nothing, and --dry-run prints the merged params, the overrides and the same problems.
The experiment runs outside the workspace (`dvc exp run --temp`, or queued), so the workspace
keeps the default's outputs; relative roots of real datasets and of an external model become
absolute for that. Ctrl-C ends the whole run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.params import RECIPE_NAME, apply_recipe, load_params
from pipeline.plan.checks import check_all
from pipeline.plan.recipes import absolute_roots, overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def run_dvc(cmd: list[str]) -> int:
    """`cmd` in its own process group: Ctrl-C (or SIGTERM) to this script ends all of it."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)

    def stop(signum: int, frame: object) -> None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise KeyboardInterrupt

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a recipe in recipes/, without .yaml")
    ap.add_argument("--queue", action="store_true", help="queue it (dvc queue start runs it)")
    ap.add_argument("--dry-run", action="store_true", help="print the params and problems")
    ap.add_argument("dvc_args", nargs="*", help="more `dvc exp run` arguments, after --")
    args = ap.parse_intermixed_args()  # `NAME --queue -- evaluate`: dvc args after the flags
    recipe_path = RECIPES / f"{args.name}.yaml"
    known = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    if not RECIPE_NAME.fullmatch(args.name) or not recipe_path.is_file():
        print(
            f"recipe: error: {args.name!r}: no such recipe in recipes/ (known: {known})",
            file=sys.stderr,
        )
        return 1
    try:
        base = load_params(ROOT / "params.yaml")
        merged = absolute_roots(apply_recipe(base, load_params(recipe_path)), ROOT)
        sets = overrides(base, merged)
        if args.dry_run:
            print(yaml.safe_dump(merged, sort_keys=False, width=100))
            print("# as `dvc exp run` overrides:\n" + "\n".join(f"#   -S {o}" for o in sets))
        check_all(merged, f"recipes/{args.name}.yaml")
    except PipelineError as e:
        print(f"recipe {args.name}: error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
    where = ["--queue"] if args.queue else ["--temp"]
    cmd = ["dvc", "exp", "run", "-n", args.name, *where]
    cmd += [arg for o in sets for arg in ("-S", o)] + args.dvc_args
    try:
        return run_dvc(cmd)
    except KeyboardInterrupt:
        print(f"recipe {args.name}: interrupted; the run was ended", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
