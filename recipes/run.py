"""Run a recipe (recipes/<name>.yaml) as a named DVC experiment: `dvc exp show` lists it by name.

Usage: python recipes/run.py NAME [--queue] [--dry-run] [-- extra dvc exp run arguments]
The recipe's values replace params.yaml's (nested groups key by key; data.source and
data.targets whole); params.yaml is restored afterwards, so the workspace keeps the default.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WHOLE = {("data", "source"), ("data", "targets")}  # stated whole by a recipe, never merged


def apply(base: dict, recipe: dict, path: tuple[str, ...] = ()) -> dict:
    """`base` with `recipe`'s values (a copy)."""
    out = copy.deepcopy(base)
    for key, value in recipe.items():
        here = (*path, key)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and here not in WHOLE:
            out[key] = apply(out[key], value, here)
        else:
            out[key] = copy.deepcopy(value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a recipe in recipes/, without .yaml")
    ap.add_argument("--queue", action="store_true", help="queue it (dvc queue start runs it)")
    ap.add_argument("--dry-run", action="store_true", help="print the params, run nothing")
    ap.add_argument("dvc_args", nargs="*", help="more `dvc exp run` arguments, after --")
    args = ap.parse_intermixed_args()  # `NAME --queue -- evaluate`: dvc args after the flags
    recipe_path = ROOT / "recipes" / f"{args.name}.yaml"
    if not recipe_path.is_file():
        known = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
        print(f"recipe: error: {recipe_path}: no such recipe (known: {known})", file=sys.stderr)
        return 1
    params_path = ROOT / "params.yaml"
    original = params_path.read_text()
    merged = apply(yaml.safe_load(original), yaml.safe_load(recipe_path.read_text()) or {})
    text = yaml.safe_dump(merged, sort_keys=False, width=100)
    if args.dry_run:
        print(text)
        return 0
    cmd = [
        "dvc",
        "exp",
        "run",
        "-n",
        args.name,
        *(["--queue"] if args.queue else []),
        *args.dvc_args,
    ]
    try:
        params_path.write_text(text)
        return subprocess.run(cmd, cwd=ROOT).returncode
    finally:
        params_path.write_text(original)


if __name__ == "__main__":
    sys.exit(main())
