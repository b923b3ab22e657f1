"""Write each dvc.yaml stage's `pipeline/` deps: exactly the modules its script imports.

    python stages/_deps.py           # rewrite dvc.yaml's module deps (comments kept)
    python stages/_deps.py --check   # exit 1, listing the stages whose deps differ

Run it after adding, moving or importing a module: a module missing from `deps` lets DVC
reuse stale outputs after it changes; an extra one re-runs a stage for code it never runs.
tests/test_dvc_yaml.py runs the check.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]


def imported_files(path: Path) -> set[str]:
    """Project files (relative paths) that `path` imports from the pipeline package."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    files = (m.replace(".", "/") + ".py" for m in names if m.startswith("pipeline"))
    return {f for f in files if (ROOT / f).is_file()}


def closure(script: str) -> set[str]:
    """The project modules `script` imports, directly or not."""
    seen: set[str] = set()
    todo = [script]
    while todo:
        for f in imported_files(ROOT / todo.pop()) - seen:
            seen.add(f)
            todo.append(f)
    return seen


def stage_deps(stage: dict) -> list[str]:
    """A stage's deps with its `pipeline/` modules replaced by its script's import closure."""
    script = re.search(r"stages/\w+\.py", stage["cmd"]).group(0)
    others = [
        d for d in stage.get("deps", []) if not str(d).startswith("pipeline/") and d != script
    ]
    modules = sorted(f for f in closure(script) if f.startswith("pipeline/"))
    return [script, *modules, *others]


def _yaml() -> YAML:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096  # long cmd lines stay on one line
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def regenerate(text: str) -> tuple[str, list[str]]:
    """dvc.yaml's text with every stage's deps regenerated, and the stages that changed."""
    yaml = _yaml()
    doc = yaml.load(text)
    changed = []
    for name, stage in doc["stages"].items():
        want = stage_deps(stage)
        if list(stage["deps"]) != want:
            changed.append(name)
            stage["deps"].clear()
            stage["deps"].extend(want)
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue(), changed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report stages whose deps differ")
    args = ap.parse_args()
    path = ROOT / "dvc.yaml"
    text, changed = regenerate(path.read_text())
    if args.check:
        if changed:
            print(f"dvc.yaml: deps differ from the imports in {changed}; run stages/_deps.py")
            return 1
        return 0
    path.write_text(text)
    print(f"dvc.yaml: deps of {changed or 'no stage'} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
