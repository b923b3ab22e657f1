"""Run a recipe (recipes/<name>.yaml) as a named DVC experiment: `dvc exp show` lists it by name.

Usage: python recipes/run.py NAME [--queue] [--dry-run] [-- extra dvc exp run arguments]

The recipe's values replace params.yaml's (nested groups key by key; data.source and
data.targets whole). Before DVC touches anything, the merged params get the pipeline's own
check (stages/check_params.py: every group, the devices, the dataset roots and model folder
exist): a recipe that cannot run stops with one line and deletes nothing, and --dry-run prints
the merged params and the same problems. The experiment runs outside the workspace (`dvc exp
run --temp`, or queued), so the workspace keeps the default's outputs; relative roots of real
datasets and of an external model become absolute for that. params.yaml is restored in the
work tree and in git's index afterwards, also after Ctrl-C, which ends the whole run.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path[:0] = [str(ROOT), str(ROOT / "stages")]  # this checkout's pipeline and stage checks
from check_params import check_all  # noqa: E402

from pipeline.core.errors import PipelineError  # noqa: E402
from pipeline.core.params import RECIPE_NAME, load_params  # noqa: E402
from pipeline.core.params import apply_recipe as apply  # noqa: E402


def absolute_roots(params: dict) -> dict:
    """Relative roots of real datasets and an external model folder made absolute (the
    experiment runs in a temporary copy of the repository, where data/external is not)."""
    out = copy.deepcopy(params)
    data = out.get("data", {})
    entries = [data.get("source", {}), *data.get("targets", {}).values()]
    for entry in entries:
        if entry.get("kind") != "synthetic" and "root" in entry:
            entry["root"] = str((ROOT / entry["root"]).resolve())
    model = out.get("model", {})
    if model.get("source", "build") != "build":
        model["source"] = str((ROOT / model["source"]).resolve())
    return out


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout


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
    params_path = ROOT / "params.yaml"
    original = params_path.read_text()
    try:
        merged = apply(load_params(params_path), load_params(recipe_path))
    except PipelineError as e:
        print(f"recipe {args.name}: error: {e}", file=sys.stderr)
        return 1
    merged = absolute_roots(merged)
    text = yaml.safe_dump(merged, sort_keys=False, width=100)
    problem = None
    try:
        check_all(merged, f"recipes/{args.name}.yaml")
    except PipelineError as e:
        problem = str(e)
    if args.dry_run:
        print(text)
    if problem is not None:
        print(f"recipe {args.name}: error: {problem}", file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
    where = ["--queue"] if args.queue else ["--temp"]
    cmd = ["dvc", "exp", "run", "-n", args.name, *where, *args.dvc_args]
    staged = _git("ls-files", "-s", "params.yaml").split()  # mode, blob, stage, path
    try:
        params_path.write_text(text)
        return run_dvc(cmd)
    except KeyboardInterrupt:
        print(f"recipe {args.name}: interrupted; the run was ended", file=sys.stderr)
        return 130
    finally:
        params_path.write_text(original)
        if staged:  # DVC stages params.yaml (core.autostage): put the index entry back
            _git("update-index", "--cacheinfo", f"{staged[0]},{staged[1]},params.yaml")


if __name__ == "__main__":
    sys.exit(main())
