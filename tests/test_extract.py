"""Extraction: SIGKILL + resume equals an uninterrupted run; torchrun ranks equal one process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import PARAMS, make_encoded, store_model, write_params

from pipeline.cache.store import FeatureStore
from pipeline.core.errors import ConfigError, StoreError
from pipeline.core.params import load_params, read_group
from pipeline.diffusion.build import ModelConfig
from pipeline.loops import extract

ROOT = Path(__file__).resolve().parents[1]
# Single-threaded torch: the test machine's cores are shared, and OpenMP spin-waits there.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
N_IMAGES = 24  # 16 source (game) images, 8 target (real) ones
EXTRACT = {**PARAMS["extract"], "batch_size": 2, "images_per_shard": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    model = store_model(root / "model")
    make_encoded(root / "encoded", model, N_IMAGES)
    write_params(root / "params.yaml", extract=EXTRACT)
    return root


def extract_cmd(root: Path, out: Path, *launcher: str) -> list[str]:
    script = [str(ROOT / "stages" / "extract.py")]
    args = ["50", str(root / "encoded"), str(root / "trajectories"), str(root / "model"), str(out)]
    return [*(launcher or (sys.executable,)), *script, *args, "--params", str(root / "params.yaml")]


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def computed(stdout: str) -> dict[str, list[int]]:
    shards: dict[str, list[int]] = {}
    for m in re.finditer(r"(\w+): computed shards \[([\d, ]*)\]", stdout):
        shards.setdefault(m.group(1), []).extend(int(s) for s in m.group(2).split(",") if s.strip())
    return {k: sorted(v) for k, v in shards.items()}


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def extract_in_process(root: Path, out: Path, params: Path) -> dict[str, list[int]]:
    """The stage's work without its process start-up (imports cost ~10 s here)."""
    p = load_params(params)
    cfg = read_group(p, "extract", extract.ExtractConfig)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1), for bitwise equality
    try:
        results = extract.run(cfg, read_group(p, "model", ModelConfig), 50, root / "encoded",
                              root / "trajectories", root / "model", out)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return {d: r.computed_shards for d, r in results.items()}


ALL = {"game": list(range(8)), "real": list(range(4))}


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "reference"
    assert extract_in_process(setup, out, setup / "params.yaml") == ALL
    return out


def test_sigkill_then_resume_equals_uninterrupted_run(setup, reference):
    out = setup / "killed"
    proc = subprocess.Popen(
        extract_cmd(setup, out),
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    first_done = out / "game" / "done" / "c" / "0"
    deadline = time.monotonic() + 90
    while not first_done.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "extraction finished before it could be killed"
    store = FeatureStore.open(out / "game")
    missing = store.missing_shards()
    done = sorted(set(range(store.n_shards)) - set(missing))
    assert done and missing, (done, missing)
    shard_file = out / "game" / "features" / "up0_res0" / "c"
    inodes = {s: (shard_file / str(s) / "0/0/0/0").stat().st_ino for s in done}

    # The rerun in-process (same code path as the stage, minus ~10 s of imports).
    assert extract_in_process(setup, out, setup / "params.yaml") == {**ALL, "game": missing}
    assert {s: (shard_file / str(s) / "0/0/0/0").stat().st_ino for s in done} == inodes
    assert FeatureStore.open(out / "game").is_complete()
    assert tree(out) == tree(reference)  # bit for bit, metadata included


def test_torchrun_two_ranks_equal_single_process(setup, reference):
    out = setup / "torchrun"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    stdout = run(extract_cmd(setup, out, *torchrun))
    ranks = re.findall(r"rank (\d): game: computed shards \[([\d, ]*)\]", stdout)
    assert sorted(r for r, _ in ranks) == ["0", "1"]
    assert all(s.strip() for _, s in ranks), "each rank must own some shards"
    assert computed(stdout) == ALL  # disjoint, together complete
    assert tree(out) == tree(reference)


def test_changed_params_refuse_the_existing_store(setup, reference):
    out = setup / "changed"
    shutil.copytree(reference, out)
    write_params(setup / "params2.yaml", extract={**EXTRACT, "noise_seed": 1})
    with pytest.raises(StoreError, match="noise_seed: stored 0 != expected 1"):
        extract_in_process(setup, out, setup / "params2.yaml")
    assert FeatureStore.open(out / "game").is_complete()
    # complete: left alone
    assert extract_in_process(setup, out, setup / "params.yaml") == {"game": [], "real": []}


@pytest.mark.parametrize(
    "timestep,message",
    [
        ("-5", r"timestep: Input should be greater than or equal to 0 \(got '-5'\)"),
        ("1000", r"--timestep 1000: must be in 0..999 for this model's scheduler"),
    ],
)
def test_bad_timestep_is_one_line_and_leaves_nothing(setup, timestep, message):
    out = setup / f"bad{timestep}"
    cmd = [sys.executable, str(ROOT / "stages" / "extract.py"), timestep, str(setup / "encoded"),
           str(setup / "trajectories"), str(setup / "model"), str(out), "--params",
           str(setup / "params.yaml")]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(message, last) and last.startswith("extract: error: "), proc.stderr
    assert not out.exists()


def test_pca_wider_than_a_tap_is_refused_before_work(setup):
    out = setup / "pca"
    with pytest.raises(ConfigError, match=r"extract.storage pca-99999: .*up0_res0 \(16\)"):
        extract_in_process(
            setup, out, write_params(setup / "p3.yaml", extract={**EXTRACT, "storage": "pca-99999"})
        )
    assert not out.exists()
