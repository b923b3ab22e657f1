"""End to end: real `dvc repro` and `dvc exp run` on a copy of the project with tiny params."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COPIED = [
    "pipeline",
    "stages",
    "recipes",
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    ".dvc/config",
]

# Small enough for a 2-core CI machine; every stage still does its real work.
TINY: dict[str, Any] = {
    "data": {
        "source": {"count": 16, "val_count": 6},
        "targets": {name: {"count": 6} for name in ("real", "fog", "night", "rain")},
        "synthetic": {"height": 64, "width": 128},
    },
    "model": {
        "small": {"vae_channels": [8, 8, 8, 8], "unet_channels": [8, 16, 32, 32], "text_hidden": 16}
    },
    "pretrain": {"steps": 4, "vae_steps": 2, "batch_size": 4, "samples_per_caption": 1},
    "encode": {"resolution": [64, 128], "batch_size": 8},
    "timesteps": [50],
    "extract": {"batch_size": 8, "images_per_shard": 4},
    "train": {"iterations": 6, "batch_size": 4, "eval_interval": 3},
    "evaluate": {"overlays": 2},
    "tune_prompt": {"steps": 2, "batch_size": 2, "images": 2, "eval_images": 4},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="ci", GIT_AUTHOR_EMAIL="ci@example.com")
    env.update(GIT_COMMITTER_NAME="ci", GIT_COMMITTER_EMAIL="ci@example.com")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{output[-6000:]}"
    return output


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    proj = tmp_path_factory.mktemp("e2e") / "proj"
    for name in COPIED:
        src, dst = ROOT / name, proj / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    params = _merge(yaml.safe_load((proj / "params.yaml").read_text()), TINY)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (proj / ".gitignore").write_text("/data/\n__pycache__/\n")
    _run(["git", "init", "-q"], proj)
    _run(["git", "add", "-A"], proj)
    _run(["git", "commit", "-qm", "tiny project"], proj)
    return proj


@pytest.mark.slow
def test_repro_writes_metrics_for_every_domain(project: Path) -> None:
    output = _run(["dvc", "repro"], project)
    expected = {"prepare", "build_model", "pretrain", "encode", "extract@50", "train"}
    assert expected | {"evaluate", "tune_prompt", "report"} <= _ran(output)
    evaluate = json.loads((project / "metrics/evaluate.json").read_text())
    assert set(evaluate) == {"game", "real", "fog", "night", "rain"}
    for scores in evaluate.values():
        assert isinstance(scores["mIoU"], float) and 0.0 <= scores["mIoU"] <= 100.0
    tuned = json.loads((project / "metrics/tune_prompt.json").read_text())
    assert set(tuned) == {"real", "fog", "night", "rain"}
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "baseline run"], project)
    assert _ran(_run(["dvc", "repro"], project)) == set()


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_push_then_pull_in_a_fresh_clone_brings_the_stores_back(
    project: Path, tmp_path: Path
) -> None:
    """How a team shares a cache: `dvc push` to a remote, `dvc pull` in a clone, and nothing
    is extracted there."""
    remote = tmp_path / "remote"
    _run(["dvc", "remote", "add", "-d", "team", str(remote)], project)
    _run(["git", "commit", "-qam", "a shared DVC remote"], project)
    _run(["dvc", "push"], project)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    _run(["dvc", "pull"], clone)
    for out in ("data/features", "data/encoded", "data/heads", "data/model"):
        assert _tree(clone / out) == _tree(project / out), out
    assert _ran(_run(["dvc", "repro"], clone)) == set()
    verified = _run([sys.executable, "-m", "pipeline.cache.verify", "data/features"], clone)
    assert "checked data/features: 0 bad files" in verified


@pytest.mark.slow
def test_adding_a_timestep_runs_only_its_extraction_and_downstream(project: Path) -> None:
    # The mission's command exactly as users type it.
    output = _run(["dvc", "exp", "run", "-S", "timesteps=[50,200]"], project)
    assert _ran(output) == {
        "check_params",
        "extract@200",
        "train",
        "evaluate",
        "tune_prompt",
        "report",
    }
    diff = json.loads(_run(["dvc", "metrics", "diff", "--json"], project))
    assert any(key.startswith("game.mIoU") for key in diff["metrics/scores.json"])
    back = _run(["dvc", "exp", "run", "-S", "timesteps=[50]"], project)
    assert not any(stage.startswith("extract@") for stage in _ran(back))


@pytest.mark.slow
def test_a_recipe_runs_as_a_named_experiment(project: Path) -> None:
    """`python recipes/run.py NAME` runs the recipe as experiment NAME; params.yaml is kept."""
    before = (project / "params.yaml").read_text()
    recipe = project / "recipes" / "tiny.yaml"
    recipe.write_text("timesteps: [50, 300]\ntrain: {iterations: 4}\n")
    _run([sys.executable, "recipes/run.py", "tiny"], project)
    assert (project / "params.yaml").read_text() == before
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], project))
    names = {e["name"] for rev in shown for e in rev.get("experiments") or [] if e.get("name")}
    assert "tiny" in names


@pytest.mark.slow
def test_crop_draws_re_encode_and_re_extract_only(project: Path) -> None:
    """`dvc exp run -S encode.crop=[64,64]`: encode and extract rerun (and what reads them),
    nothing upstream; the source's training images become crop draws read whole."""
    output = _run(
        ["dvc", "exp", "run", "-S", "encode.crop=[64,64]", "-S", "encode.draws=2"], project
    )
    ran = _ran(output)
    assert {"encode", "extract@50", "train", "evaluate"} <= ran
    assert not ran & {"prepare", "build_model", "pretrain"}
    sets = sorted(p.name for p in (project / "data/features/t50").iterdir())
    assert sets == ["fog", "game", "game-crops", "night", "rain", "real"]
    crops = json.loads((project / "data/features/t50/game-crops/zarr.json").read_text())
    assert crops["attributes"]["taps"]["up3_res0"]["height"] == 64 // 8
    evaluate = json.loads((project / "metrics/evaluate.json").read_text())
    assert set(evaluate) == {"game", "real", "fog", "night", "rain"}
    # Rerun as is: nothing to do (the draws are seeded, the stores kept).
    again = _run(
        ["dvc", "exp", "run", "-S", "encode.crop=[64,64]", "-S", "encode.draws=2"], project
    )
    assert _ran(again) == set()
