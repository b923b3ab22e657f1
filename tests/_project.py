"""A tiny copy of the project in a real git repository, for tests that run real DVC."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

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
    "extract": {"batch_size": 8, "shard_mb": 0.1},  # 4 images a shard (helpers.shard_mb)
    "train": {"iterations": 6, "batch_size": 4, "eval_interval": 3},
    "evaluate": {"overlays": 2},
    "tune_prompt": {"steps": 2, "batch_size": 2, "images": 2, "eval_images": 4},
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into `base` group by group (in place)."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def git_env() -> dict[str, str]:
    env = dict(os.environ, GIT_AUTHOR_NAME="ci", GIT_AUTHOR_EMAIL="ci@example.com")
    env.update(GIT_COMMITTER_NAME="ci", GIT_COMMITTER_EMAIL="ci@example.com")
    return env


def run(args: list[str], cwd: Path) -> str:
    """Output of a command that must succeed (its tail in the failure message)."""
    proc = subprocess.run(args, cwd=cwd, env=git_env(), capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{output[-6000:]}"
    return output


def ran(output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_project(proj: Path, over: dict[str, Any] | None = None) -> Path:
    """The project's code, dvc.yaml and params (TINY, then `over`) in a fresh git repo."""
    for name in COPIED:
        src, dst = ROOT / name, proj / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    params = merge(yaml.safe_load((proj / "params.yaml").read_text()), TINY)
    params = merge(params, over or {})
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (proj / ".gitignore").write_text("/data/\n__pycache__/\n")
    run(["git", "init", "-q"], proj)
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "tiny project"], proj)
    return proj
