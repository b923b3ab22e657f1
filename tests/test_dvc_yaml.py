"""dvc.yaml: every stage depends on each project module its script imports, directly or not.

A module missing from `deps` lets DVC reuse stale outputs after that module changes.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pipeline_imports(path: Path) -> set[str]:
    """Project files (relative paths) that `path` imports from the pipeline package."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pipeline import x`
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("pipeline"))
    files = (name.replace(".", "/") + ".py" for name in names)
    return {f for f in files if (ROOT / f).is_file()}


def _closure(script: str) -> set[str]:
    seen: set[str] = set()
    todo = [script]
    while todo:
        for f in _pipeline_imports(ROOT / todo.pop()) - seen:
            seen.add(f)
            todo.append(f)
    return seen


def test_stage_deps_cover_imported_modules() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # foreach stages keep their body under `do`
        script = re.search(r"stages/\w+\.py", stage["cmd"]).group(0)
        deps = set(stage.get("deps", []))
        assert script in deps, f"{name}: its script {script} is not a dep"
        if gaps := sorted(_closure(script) - deps):
            missing[name] = gaps
    assert not missing, f"dvc.yaml stages lack deps on modules they import: {missing}"
