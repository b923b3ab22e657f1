"""Faults a user meets (the cases of docs/architecture.md, "When something is wrong"): each is
one line naming the key or the file, exit status 1, and nothing lost. The cases that need a
DVC project (a truncated shard under `dvc repro`, Ctrl-C on a recipe, duplicate timesteps) are
in tests/test_e2e_dvc.py; a label changed after prepare in tests/test_evaluate.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import config, extract, make_encoded, shard_mb, store_model, write_params

from pipeline.cache.encoded import INDEX_NAME, LATENTS_NAME
from pipeline.cache.store import FeatureStore
from pipeline.cache.verify import verify
from pipeline.core.device import check_device, gpu_wait_s, resolve_device
from pipeline.core.errors import ConfigError
from pipeline.core.fileio import atomic_path
from pipeline.loops.extract import ExtractConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
NO_GPU = not torch.cuda.is_available()
PROGRESS = re.compile(r"\d+%\|.*\|")  # a tqdm bar


def stage(name: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "stages" / f"{name}.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def train_stage(encoded: Path, params: Path) -> subprocess.CompletedProcess:
    """The train stage on the encoded fixture's cache, with `params`."""
    outs = ("encoded", "features", "heads", "checkpoint", "train.json", "plots", "live")
    return stage("train", *(encoded / o for o in outs), "--params", params)


def one_line(proc: subprocess.CompletedProcess, stage_name: str) -> str:
    """The single line a failing stage printed (exit status 1)."""
    assert proc.returncode == 1, proc.stderr[-2000:]
    # Progress bars redraw with \r on stderr: what remains besides them is the message.
    parts = [p for ln in proc.stderr.splitlines() for p in ln.split("\r") if p.strip()]
    lines = [p for p in parts if not PROGRESS.search(p)]
    assert len(lines) == 1 and lines[0].startswith(f"{stage_name}: error: "), proc.stderr[-2000:]
    return lines[0]


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture()
def encoded(tmp_path: Path) -> Path:
    model = store_model(tmp_path / "model")
    make_encoded(tmp_path / "encoded", model, 6)
    extract = {"batch_size": 2, "shard_mb": shard_mb(2, model)}
    write_params(tmp_path / "params.yaml", extract=extract)
    return tmp_path


def test_2_corrupt_latents_stop_extract_naming_the_array(encoded: Path) -> None:
    shard = encoded / "encoded" / "game" / LATENTS_NAME / "c.0.0.0.0.0"
    flip(shard, shard.stat().st_size // 3)
    out = encoded / "features" / "t50"
    proc = stage(
        "extract",
        "--timestep",
        50,
        encoded / "encoded",
        encoded / "trajectories",
        encoded / "model",
        out.parent,
        encoded / "metrics",
        "--params",
        encoded / "params.yaml",
    )
    line = one_line(proc, "extract")
    assert f"{encoded}/encoded/game/latents.zarr: corrupt chunk" in line
    # Nothing checksummed from bad inputs: no shard of the source was written.
    assert not FeatureStore.open(out / "game").done_mask().any()
    # verify names the array's shard file, and --delete removes the array (encode rewrites it).
    assert verify([encoded / "encoded"]) == 1
    assert verify([encoded / "encoded"], delete=True) == 1
    assert not (encoded / "encoded" / "game" / LATENTS_NAME).exists()


def test_3_damaged_store_metadata_is_found_and_deleted_for_extract_to_recreate(
    encoded: Path, capsys
) -> None:
    model = store_model(encoded / "model2")
    cfg = config("extract", ExtractConfig, batch_size=2, shard_mb=shard_mb(2, model))
    for name in ("group", "array", "done"):
        out = encoded / name
        extract(model, encoded / "encoded", 50, out, cfg)
        damaged = {
            "group": out / "zarr.json",
            "array": FeatureStore.open(out).tap_file("up0_res0").path / "zarr.json",
            "done": out / "done" / "c.0",
        }[name]
        damaged.write_bytes(damaged.read_bytes()[:-5] + b"oops!")
        assert verify([out]) == 1
        printed = capsys.readouterr().out
        assert str(damaged if name != "done" else out / "done") in printed, printed
        assert verify([out], delete=True) == 1
        assert not out.exists()  # the whole store: extract recreates it
        extract(model, encoded / "encoded", 50, out, cfg)
        assert verify([out]) == 0


def test_4_damaged_model_weights_are_named_by_verify_model(tmp_path: Path) -> None:
    """A flipped byte with size and mtime kept is invisible to the recorded fingerprint's
    stats; `verify --model` re-hashes every file and names the damaged one."""
    store_model(tmp_path / "model")
    weights = tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    flip(weights, stat.st_size - 100)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cli = [sys.executable, "-m", "pipeline.cache.verify", "--model", str(tmp_path / "model")]
    proc = subprocess.run(cli, cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0].startswith(f"{weights}: files hash to ")
    assert "not the recorded fingerprint" in proc.stdout
    subprocess.run([*cli, "--delete"], cwd=tmp_path, env=ENV, capture_output=True)
    assert not weights.exists()  # pretrain (or build_model) rewrites it under `dvc repro`


def test_5_a_recipe_that_cannot_run_touches_nothing(tmp_path: Path) -> None:
    before = (ROOT / "params.yaml").read_bytes()
    index = subprocess.run(
        ["git", "ls-files", "-s", "params.yaml"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    proc = subprocess.run(
        [sys.executable, "recipes/run.py", "diff-gta2cs"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1
    assert lines[0].startswith("recipe diff-gta2cs: error: recipes/diff-gta2cs.yaml: ")
    assert "data/external/gta5" in lines[0] and "stable-diffusion-2-1" in lines[0]
    assert "Running stage" not in proc.stdout  # DVC never started
    assert (ROOT / "params.yaml").read_bytes() == before
    after = subprocess.run(
        ["git", "ls-files", "-s", "params.yaml"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert after == index


@pytest.mark.skipif(not NO_GPU, reason="a machine with a GPU")
def test_7_9_devices_this_machine_lacks_are_one_line(encoded: Path) -> None:
    for device, message in (
        ("cuda", "model.device cuda: this machine has no CUDA GPU"),
        ("cuda:1", "model.device cuda:1: this machine has no CUDA GPU"),
        ("cuda:free", "model.device cuda:free: this machine has no CUDA GPU"),
    ):
        with pytest.raises(ConfigError, match=message):
            resolve_device(device, "model.device")
    check_device("cpu", "model.device")
    assert (gpu_wait_s("cuda:free"), gpu_wait_s("cuda:free:600")) == (24 * 3600, 600)
    with pytest.raises(ConfigError, match="cuda:free:soon: expected cuda:free or cuda:free:<"):
        check_device("cuda:free:soon", "model.device")
    # The stages say so before any work, in one line (fp16 on a GPU: the model's precision).
    params = write_params(encoded / "gpu.yaml", model={"device": "cuda", "dtype": "fp16"})
    out = encoded / "enc2"
    proc = stage(
        "encode",
        encoded,
        encoded / "datasets",
        encoded / "model",
        out,
        encoded / "e.json",
        "--params",
        params,
    )
    assert "model.device cuda: this machine has no CUDA GPU" in one_line(proc, "encode")
    params = write_params(encoded / "ev.yaml", evaluate={"device": "cuda:free"})
    proc = stage("check_params", encoded / "ok", "--params", params)
    line = one_line(proc, "check_params")
    assert "evaluate.device cuda:free: this machine has no CUDA GPU" in line
    assert not out.exists() and not (encoded / "ok").exists()


def test_10_processes_that_do_not_divide_the_batch_stop_before_torchrun(encoded: Path) -> None:
    params = write_params(encoded / "p.yaml", train={"processes": 3, "batch_size": 8})
    proc = train_stage(encoded, params)
    line = one_line(proc, "train")
    assert line.endswith(
        "train: batch_size 8 must be a multiple of processes 3 (each process takes an equal "
        "share of every batch)"
    )
    assert "torch.distributed" not in proc.stderr and not (encoded / "heads").exists()


def test_12_a_truncated_index_is_one_line(encoded: Path) -> None:
    index = encoded / "encoded" / INDEX_NAME
    index.write_bytes(index.read_bytes()[:100])
    proc = train_stage(encoded, encoded / "params.yaml")
    line = one_line(proc, "train")
    assert line.endswith(
        f"{index}: content differs from its recorded sha256 (index.parquet.sha256): corrupt or "
        f"changed; rerun encode (or `dvc checkout {encoded / 'encoded'}`)"
    )


def test_8_a_killed_writers_temporary_folder_is_cleaned_by_the_next_run(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "predictions") as tmp:
        tmp.mkdir()
        (tmp / "a.png").write_bytes(b"x")
        left = tmp.parent
        shutil.copytree(left, tmp_path / "kept")  # what a SIGKILL would have left
        raise RuntimeError
    (tmp_path / "kept").rename(left)
    assert left.exists()
    with atomic_path(tmp_path / "predictions") as tmp:
        tmp.mkdir()
    assert not left.exists() and (tmp_path / "predictions").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions"]
