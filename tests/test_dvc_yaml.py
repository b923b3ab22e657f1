"""dvc.yaml: each stage depends on exactly the project modules its script imports.

A module missing from `deps` lets DVC reuse stale outputs after it changes; an extra one re-runs
a stage for code it never runs (editing the store must not re-run pretraining).
"""

from __future__ import annotations

import re

import yaml
from test_layers import ROOT, imported_files


def closure(script: str) -> set[str]:
    """The project modules `script` imports, directly or not."""
    seen: set[str] = set()
    todo = [script]
    while todo:
        for f in imported_files(ROOT / todo.pop()) - seen:
            seen.add(f)
            todo.append(f)
    return seen


def test_stage_deps_are_the_modules_their_scripts_import() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    wrong = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # foreach stages keep their body under `do`
        script = re.search(r"stages/\w+\.py", stage["cmd"]).group(0)
        deps = {d for d in stage.get("deps", []) if d.startswith("pipeline/")}
        assert script in stage["deps"], f"{name}: its script {script} is not a dep"
        want = {f for f in closure(script) if f.startswith("pipeline/")}
        if deps != want:
            wrong[name] = {"missing": sorted(want - deps), "extra": sorted(deps - want)}
    assert not wrong, f"dvc.yaml deps differ from the imports: {wrong}"


def test_the_layers_keep_slow_stages_apart() -> None:
    """The tangles the layout exists to avoid: what each expensive stage must not depend on."""
    assert not {f for f in closure("stages/pretrain.py") if f.startswith("pipeline/cache/")}
    train = closure("stages/train.py") | closure("stages/evaluate.py")
    assert not {f for f in train if f.startswith("pipeline/diffusion/")}
    assert "pipeline/loops/train.py" not in closure("stages/evaluate.py")


def test_no_stage_lists_the_timestep_list_but_those_reading_every_store() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    readers = {name for name, s in stages.items() if "timesteps" in s.get("params", [])}
    assert readers == {"train", "evaluate"}
    assert stages["extract"]["foreach"] == "${timesteps}"
