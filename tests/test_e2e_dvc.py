"""End to end: real `dvc repro` and `dvc exp run` on a copy of the project with tiny params."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _project import ROOT, git_env, make_project
from _project import ran as _ran
from _project import run as _run

from pipeline.cache.store import FeatureStore
from pipeline.core.fileio import folder_bytes
from pipeline.core.params import load_params
from pipeline.plan.budget import plan


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("e2e") / "proj")


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
    # The budget `python -m pipeline.plan` printed before the run: stores within 5 %, the
    # encoded latents and labels at most their raw bytes (zstd on disk).
    budget = plan(load_params(project / "params.yaml"), root=project, count_flops=False)
    stores = sum(r.bytes for r in budget.rows if r.stage.startswith("extract"))
    assert stores == pytest.approx(folder_bytes(project / "data/features"), rel=0.05)
    encoded = sum(r.bytes for r in budget.rows if r.stage == "encode")
    assert folder_bytes(project / "data/encoded") <= encoded
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
    _run(["dvc", "remote", "modify", "team", "verify", "true"], project)  # as docs/store.md
    _run(["git", "commit", "-qam", "a shared DVC remote"], project)
    _run(["dvc", "push"], project)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    _run(["dvc", "pull"], clone)
    for out in ("data/features", "data/encoded", "data/heads", "data/model"):
        assert _tree(clone / out) == _tree(project / out), out
    assert _ran(_run(["dvc", "repro"], clone)) == set()
    verified = _run([sys.executable, "-m", "pipeline.cache.verify", "data/features"], clone)
    assert "checked data/features: 0 problems" in verified
    # A damaged object in the remote: with `verify`, DVC re-hashes what it downloads and
    # refuses it (the pull fails, naming the output); nothing damaged is checked out.
    head = next(p for p in (project / "data/heads").iterdir() if p.name == "model.safetensors")
    md5 = hashlib.md5(head.read_bytes()).hexdigest()
    damaged = remote / "files" / "md5" / md5[:2] / md5[2:]
    damaged.chmod(0o644)
    damaged.write_bytes(b"not the head's weights")
    again = tmp_path / "again"
    _run(["git", "clone", "-q", str(project), str(again)], tmp_path)
    pull = subprocess.run(["dvc", "pull"], cwd=again, capture_output=True, text=True)
    assert pull.returncode != 0 and "data/heads" in pull.stdout + pull.stderr
    assert not (again / "data/heads/model.safetensors").exists()


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
    """`python recipes/run.py NAME` runs the recipe as experiment NAME (its values as `dvc exp
    run -S` overrides): --dry-run touches nothing (stat data included); the run leaves
    params.yaml's bytes and git's index entries as they were. DVC itself writes the -S values
    into params.yaml for a moment while it stashes the experiment, and writes the file back
    (dvc/repo/experiments/queue/base.py `_stash_exp`), so the run changes its mtime only."""
    before = (project / "params.yaml").read_text()
    # Stat data settled first (a fresh clone's entries may hold zeros that any `git status`
    # fills in); after that, only a file rewritten would change it.
    _run(["git", "status", "--porcelain"], project)  # refreshes and writes the index
    index = _run(["git", "ls-files", "-s", "--debug"], project)
    recipe = project / "recipes" / "tiny.yaml"
    recipe.write_text("timesteps: [50, 300]\ntrain: {iterations: 4}\n")
    dry = subprocess.run(
        [sys.executable, "recipes/run.py", "diff-gta2cs", "--dry-run"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert "-S extract.noise_mode='trajectory'" in dry.stdout  # an override, not a rewrite
    assert _run(["git", "ls-files", "-s", "--debug"], project) == index
    entries = _run(["git", "ls-files", "-s"], project)
    _run([sys.executable, "recipes/run.py", "tiny"], project)
    assert (project / "params.yaml").read_text() == before
    assert _run(["git", "ls-files", "-s"], project) == entries
    assert _run(["git", "diff", "--cached", "--name-only"], project) == ""
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
    proc = subprocess.Popen(
        [sys.executable, "recipes/run.py", "slow"],
        cwd=project,
        env=git_env(),
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
@pytest.mark.parametrize(
    "override,message",
    [
        ("timesteps=[50,50]", "timesteps: [50] listed more than once"),
        ("timesteps=[50.0]", "timesteps.0: Input should be a valid integer (got 50.0)"),
        ("encode.crop=[500,500]", "encode.crop [500, 500]: must be a multiple of 64"),
        (
            "sampling.feature_crop=[7,7]",
            "sampling.feature_crop [7, 7] must be a multiple of the largest stride 64",
        ),
    ],
)
def test_bad_params_are_refused_before_anything_is_removed(
    project: Path, override: str, message: str
) -> None:
    """What encode, extract or train would refuse is refused by check_params, which runs
    before DVC removes any stage's outputs (once encode found a bad crop after DVC had deleted
    data/encoded)."""
    before = {p: (project / p).read_bytes() for p in ("metrics/train.json", "metrics/scores.json")}
    kept = {out: _tree(project / "data" / out) for out in ("heads", "encoded")}
    proc = subprocess.run(
        ["dvc", "exp", "run", "-S", override], cwd=project, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert f"check_params: error: params.yaml: {message}" in proc.stdout + proc.stderr
    assert {p: (project / p).read_bytes() for p in before} == before
    assert {out: _tree(project / "data" / out) for out in kept} == kept
    _run(["git", "checkout", "--", "params.yaml"], project)
    _run(["dvc", "checkout"], project)


@pytest.mark.slow
def test_no_value_of_timesteps_reaches_a_shell(project: Path) -> None:
    """DVC pastes a foreach item into cmd as is; the matrix item it quotes, and the stage
    refuses it: `dvc repro -s` (check_params skipped) runs no injected command."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["timesteps"] = ["7; touch pwned", 50]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(
        ["dvc", "repro", "-s", "extract@7; touch pwned"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "--timestep '7; touch pwned'" in out, out[-3000:]
    assert "extract: error: params.yaml: timesteps.0: Input should be a valid integer" in out
    assert not (project / "pwned").exists()
    _run(["git", "checkout", "--", "params.yaml"], project)


@pytest.fixture(scope="module")
def traj_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project with DIFF's cached inversion (every artifact kind on disk), reproduced
    and committed."""
    over = {
        "timesteps": [5],
        "extract": {"noise_mode": "trajectory"},
        "invert": {"schedule": [20, 10, 5, 1], "batch_size": 8},
    }
    proj = make_project(tmp_path_factory.mktemp("e2e-traj") / "proj", over)
    _run(["dvc", "repro"], proj)
    budget = plan(load_params(proj / "params.yaml"), root=proj, count_flops=False)
    stores = sum(r.bytes for r in budget.rows if r.stage.startswith("extract"))
    assert stores == pytest.approx(folder_bytes(proj / "data/features"), rel=0.05)
    trajectories = sum(r.bytes for r in budget.rows if r.stage == "invert")
    assert 0.5 * trajectories < folder_bytes(proj / "data/trajectories") <= trajectories
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
    shard = _tap_files(proj / "data/features/t5/game", "up1_attn0")[-1]
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
        proj / "data/encoded/game/latents.zarr/c.0.0.0.0.0",  # its first shard file
        proj / "data/trajectories/game/plain.zarr/c.0.0.0.0.0.0",
        _tap_files(proj / "data/features/t5/real", "up2_res1")[0],
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
        "data/encoded/game/latents.zarr/c.0.0.0.0.0",
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


def _tap_files(store: Path, tap: str) -> list[Path]:
    """The shard files holding `tap` (its group's values), in shard order."""
    values = FeatureStore.open(store).tap_file(tap).path
    return sorted(values.glob("c.*"), key=lambda p: int(p.name.split(".")[1]))


def _damaged_cache_files(proj: Path) -> list[Path]:
    """Files of DVC's cache whose content no longer matches the md5 they are named by."""
    return [
        p
        for p in sorted((proj / ".dvc/cache/files/md5").rglob("*"))
        if p.is_file()
        and not p.name.endswith(".dir")
        and hashlib.md5(p.read_bytes()).hexdigest() != p.parent.name + p.name
    ]


@pytest.mark.slow
def test_a_hardlinked_cache_stays_intact_when_extract_replaces_shards(traj_project: Path) -> None:
    """cache.type hardlink (the project's choice where reflinks are missing): the stores and
    DVC's cache share files, so a write into one would change both. Extract never writes into a
    file: it recomputes a removed shard, then replaces the whole store for other settings, and
    every cached file keeps its md5; the baseline comes back from the cache, verified."""
    proj = traj_project
    _run(["dvc", "config", "cache.type", "hardlink"], proj)
    _run(["dvc", "checkout", "--relink"], proj)
    lock = _data_outs(proj)
    shard = _tap_files(proj / "data/features/t5/game", "up1_attn0")[0]
    assert shard.stat().st_nlink == 2  # the workspace's file is the cache's
    shard.unlink()  # gone: extract recomputes that shard (and rewrites its done flag)
    assert _ran(_run(["dvc", "repro"], proj)) == {"extract@5"}
    assert _data_outs(proj) == lock and _damaged_cache_files(proj) == []
    out = _run(["dvc", "exp", "run", "-S", "extract.noise_seed=1"], proj)
    assert "extract@5" in _ran(out) and "removed (other settings" in out
    assert _damaged_cache_files(proj) == []
    _run(["git", "checkout", "--", "params.yaml", "dvc.lock"], proj)
    _run(["dvc", "checkout"], proj)
    assert _data_outs(proj) == lock
    assert _verify(proj, "data/features").returncode == 0
    assert _damaged_cache_files(proj) == []


@pytest.mark.slow
def test_the_slurm_array_script_extracts_what_one_process_did(
    traj_project: Path, tmp_path: Path
) -> None:
    """docs/slurm/extract-array.sh, with tests/slurm/sbatch standing in for Slurm (each job run
    when submitted, an array's tasks side by side with SLURM_ARRAY_* set as Slurm sets them):
    extract@5's stores, deleted, come back from three tasks byte-identical, and the script's
    `dvc commit` records the md5 dvc.lock had; DVC then has nothing to run."""
    proj = traj_project
    lock = _data_outs(proj)
    before = {s: _tree(proj / "data/features/t5" / s) for s in ("game", "real")}
    shutil.rmtree(proj / "data/features/t5")
    shutil.copytree(ROOT / "docs/slurm", proj / "docs/slurm")
    slurm = tmp_path / "slurm"
    env = {
        **git_env(),
        "PATH": f"{ROOT / 'tests/slurm'}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_DIR": str(slurm),
    }
    script = ["bash", "docs/slurm/extract-array.sh", "5", "3"]
    done = subprocess.run(script, cwd=proj, env=env, capture_output=True, text=True)
    logs = "".join(p.read_text() for p in sorted(slurm.glob("*.log")))
    assert done.returncode == 0, done.stderr + logs[-3000:]
    assert [p.read_text().strip() for p in sorted(slurm.glob("*.rc"))] == ["0", "0", "0"], logs
    assert all(f"rank {i}: game: computed shards" in logs for i in range(3))
    assert {s: _tree(proj / "data/features/t5" / s) for s in ("game", "real")} == before
    assert _data_outs(proj) == lock
    assert _ran(_run(["dvc", "repro", "extract@5"], proj)) == set()
