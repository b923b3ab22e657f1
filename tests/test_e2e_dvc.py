"""End to end: real `dvc repro` and `dvc exp run` on a copy of the project with tiny params."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
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


def _pipeline_processes(root: Path) -> list[int]:
    """PIDs of processes running in (or on files of) the project: none once a run has ended."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if "stages/" in cmd and (str(root) in cwd or str(root) in cmd):
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_interrupting_a_recipe_ends_the_run_and_restores_params(project: Path) -> None:
    """Ctrl-C (SIGINT) to `recipes/run.py` alone: the whole run ends (no orphaned stage),
    params.yaml is as before in the work tree and in git's index, the workspace untouched."""
    (project / "recipes" / "slow.yaml").write_text("pretrain: {steps: 100000}\n")
    before = (project / "params.yaml").read_bytes()
    index = _run(["git", "ls-files", "-s", "params.yaml"], project)
    model = _tree(project / "data" / "model")
    env = dict(os.environ, GIT_AUTHOR_NAME="ci", GIT_AUTHOR_EMAIL="ci@example.com")
    env.update(GIT_COMMITTER_NAME="ci", GIT_COMMITTER_EMAIL="ci@example.com")
    proc = subprocess.Popen(
        [sys.executable, "recipes/run.py", "slow"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any(
        "pretrain" in open(f"/proc/{p}/cmdline").read() for p in _pipeline_processes(project)
    ):
        time.sleep(1)
    assert _pipeline_processes(project), "pretrain never started"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    time.sleep(2)
    assert _pipeline_processes(project) == []
    assert (project / "params.yaml").read_bytes() == before
    assert _run(["git", "ls-files", "-s", "params.yaml"], project) == index
    assert _tree(project / "data" / "model") == model  # the experiment ran outside it


@pytest.mark.slow
def test_duplicate_timesteps_are_refused_before_anything_is_removed(project: Path) -> None:
    before = {p: (project / p).read_bytes() for p in ("metrics/train.json", "metrics/scores.json")}
    heads = _tree(project / "data" / "heads")
    env = dict(os.environ)
    proc = subprocess.run(
        ["dvc", "exp", "run", "-S", "timesteps=[50,50]"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "check_params: error: params.yaml: timesteps: [50] listed more than once" in (
        proc.stdout + proc.stderr
    )
    assert {p: (project / p).read_bytes() for p in before} == before
    assert _tree(project / "data" / "heads") == heads
    _run(["git", "checkout", "--", "params.yaml"], project)
    _run(["dvc", "checkout"], project)


@pytest.fixture(scope="module")
def traj_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project with DIFF's cached inversion (every artifact kind on disk), reproduced
    and committed."""
    proj = tmp_path_factory.mktemp("e2e-traj") / "proj"
    for name in COPIED:
        src, dst = ROOT / name, proj / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    over = {
        **TINY,
        "timesteps": [5],
        "extract": {**TINY["extract"], "noise_mode": "trajectory"},
        "invert": {"schedule": [20, 10, 5, 1], "batch_size": 8},
    }
    params = _merge(yaml.safe_load((proj / "params.yaml").read_text()), over)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (proj / ".gitignore").write_text("/data/\n__pycache__/\n")
    _run(["git", "init", "-q"], proj)
    _run(["dvc", "repro"], proj)
    _run(["git", "add", "-A"], proj)
    _run(["git", "commit", "-qm", "reproduced"], proj)
    return proj


def _data_outs(proj: Path) -> dict[str, str]:
    """The md5 of every data/ output dvc.lock records (metrics files hold timings that differ)."""
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    return {
        out["path"]: out["md5"]
        for stage in lock.values()
        for out in stage.get("outs", [])
        if out["path"].startswith("data/")
    }


def _verify(proj: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.cache.verify", *args]
    return subprocess.run(cmd, cwd=proj, capture_output=True, text=True)


@pytest.mark.slow
def test_a_truncated_shard_is_repaired_by_dvc_repro(traj_project: Path) -> None:
    """`dvc repro` after a truncation inside a store: extract@5 finds the shard (resume checks
    what it keeps), recomputes it, and dvc.lock records exactly the store it had."""
    proj = traj_project
    lock = _data_outs(proj)
    shard = _files(proj / "data/features/t5/game/features/up1_attn0/values/c")[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert _verify(proj, "data/features").returncode == 1
    out = _run(["dvc", "repro"], proj)
    assert _ran(out) == {"extract@5"} and "fail their checks; recomputing them" in out
    assert _verify(proj, "data/features").returncode == 0
    assert _data_outs(proj) == lock


@pytest.mark.slow
def test_one_corrupt_file_of_each_kind_is_named_deleted_and_rebuilt(traj_project: Path) -> None:
    """A flipped byte in the latents, a trajectory, a store, the heads and the model weights
    (size and mtime kept): verify names all five; --delete and `dvc repro` give back the same
    scores and the same dvc.lock."""
    proj = traj_project
    lock = _data_outs(proj)
    scores = (proj / "metrics/scores.json").read_text()
    victims = [
        _files(proj / "data/encoded/game/latents.zarr/c")[0],
        _files(proj / "data/trajectories/game/plain.zarr/c")[0],
        _files(proj / "data/features/t5/real/features/up2_res1/values/c")[0],
        proj / "data/heads/model.safetensors",
        proj / "data/model/unet/diffusion_pytorch_model.safetensors",
    ]
    for path in victims:
        st = path.stat()
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    found = _verify(proj, "--model", "data/model")
    assert found.returncode == 1
    named = {line.split(": ", 1)[0] for line in found.stdout.splitlines() if ": " in line}
    assert {
        "data/encoded/game/latents.zarr/c/0/0/0/0/0",
        str(victims[1].relative_to(proj)),
        str(victims[2].relative_to(proj)),
        "data/heads/model.safetensors",
        "data/model/unet/diffusion_pytorch_model.safetensors",
    } <= named, found.stdout
    assert _verify(proj, "--model", "data/model", "--delete").returncode == 1
    _run(["dvc", "repro"], proj)
    assert _verify(proj, "--model", "data/model").returncode == 0
    assert (proj / "metrics/scores.json").read_text() == scores
    assert _data_outs(proj) == lock


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())
