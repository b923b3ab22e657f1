"""dvc.yaml: each stage depends on exactly the project modules its script imports.

A module missing from `deps` lets DVC reuse stale outputs after it changes; an extra one re-runs
a stage for code it never runs (editing the store must not re-run pretraining).
"""

from __future__ import annotations

import subprocess
import sys

import yaml
from _deps import ROOT, closure, regenerate


def test_stage_deps_are_the_modules_their_scripts_import() -> None:
    """dvc.yaml's module deps are what `python stages/_deps.py` writes from the imports."""
    text = (ROOT / "dvc.yaml").read_text()
    regenerated, changed = regenerate(text)
    assert not changed, f"dvc.yaml deps differ from the imports in {changed}: run stages/_deps.py"
    assert regenerated == text  # the rewrite keeps every comment and line as it is
    proc = subprocess.run(
        [sys.executable, "stages/_deps.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


def test_a_new_import_is_caught_and_written() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    text = (ROOT / "dvc.yaml").read_text().replace("      - pipeline/loops/report.py\n", "")
    _, changed = regenerate(text)
    assert "report" in changed and "pipeline/loops/report.py" in stages["report"]["deps"]


def test_the_layers_keep_slow_stages_apart() -> None:
    """The tangles the layout exists to avoid: what each expensive stage must not depend on."""
    assert not {f for f in closure("stages/pretrain.py") if f.startswith("pipeline/cache/")}
    train = closure("stages/train.py") | closure("stages/evaluate.py")
    assert not {f for f in train if f.startswith("pipeline/diffusion/")}
    assert "pipeline/loops/train.py" not in closure("stages/evaluate.py")


def test_no_stage_lists_the_timestep_list_but_those_reading_every_store() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    readers = {name for name, s in stages.items() if "timesteps" in s.get("params", [])}
    assert readers == {"check_params", "train", "evaluate"}
    # A matrix item is pasted into cmd shell-quoted (`--timestep '<value>'`); foreach's is not.
    assert stages["extract"]["matrix"] == {"timestep": "${timesteps}"}
    assert "${item}" in stages["extract"]["cmd"] and "${item." not in stages["extract"]["cmd"]


def test_every_stage_waits_for_the_params_check() -> None:
    """DVC removes a stage's outputs before it runs: params only a later stage could refuse are
    refused by check_params first, so every other stage depends on its output."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    check = stages["check_params"]
    groups = {"seed", "timesteps", *yaml.safe_load((ROOT / "params.yaml").read_text())}
    assert set(check["params"]) == groups
    for name, stage in stages.items():
        if name != "check_params":
            assert "data/params.ok" in stage.get("do", stage)["deps"], name
