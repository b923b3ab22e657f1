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

from pipeline.cache.encoded import open_latents, read_index, read_prompts
from pipeline.cache.store import FeatureStore
from pipeline.core.errors import ConfigError, StoreError
from pipeline.core.params import load_params, read_group
from pipeline.diffusion.model import load_diffusion_model
from pipeline.loops.extract import ExtractConfig, extract_store

ROOT = Path(__file__).resolve().parents[1]
# Single-threaded torch: the test machine's cores are shared, and OpenMP spin-waits there.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
N_IMAGES = 24
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
    args = ["50", str(root / "encoded"), str(root / "model"), str(out)]
    return [*(launcher or (sys.executable,)), *script, *args, "--params", str(root / "params.yaml")]


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def computed(stdout: str) -> list[int]:
    shards: list[int] = []
    for m in re.finditer(r"computed shards \[([\d, ]*)\]", stdout):
        shards += [int(s) for s in m.group(1).split(",") if s.strip()]
    return sorted(shards)


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def extract_in_process(root: Path, out: Path, params: Path) -> list[int]:
    """The stage's work without its process start-up (imports cost ~10 s here)."""
    cfg = read_group(load_params(params), "extract", ExtractConfig)
    model = load_diffusion_model(root / "model", parts=("unet",))
    enc = root / "encoded"
    prompts = read_prompts(enc)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1), for bitwise equality
    try:
        result = extract_store(
            model, open_latents(enc), read_index(enc), prompts, 50, out, cfg, "fp32", progress=False
        )
    finally:
        torch.set_num_threads(threads)
    return result.computed_shards


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "reference"
    assert extract_in_process(setup, out, setup / "params.yaml") == list(range(N_IMAGES // 2))
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
    first_done = out / "done" / "c" / "0"
    deadline = time.monotonic() + 90
    while not first_done.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "extraction finished before it could be killed"
    store = FeatureStore.open(out)
    missing = store.missing_shards()
    done = sorted(set(range(store.n_shards)) - set(missing))
    assert done and missing, (done, missing)
    shard_file = out / "features" / "up0_res0" / "c"
    inodes = {s: (shard_file / str(s) / "0/0/0/0").stat().st_ino for s in done}

    # The rerun in-process (same code path as the stage, minus ~10 s of imports).
    assert extract_in_process(setup, out, setup / "params.yaml") == missing
    assert {s: (shard_file / str(s) / "0/0/0/0").stat().st_ino for s in done} == inodes
    assert FeatureStore.open(out).is_complete()
    assert tree(out) == tree(reference)  # bit for bit, metadata included


def test_torchrun_two_ranks_equal_single_process(setup, reference):
    out = setup / "torchrun"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    stdout = run(extract_cmd(setup, out, *torchrun))
    ranks = re.findall(r"rank (\d): computed shards \[([\d, ]*)\]", stdout)
    assert sorted(r for r, _ in ranks) == ["0", "1"]
    assert all(s.strip() for _, s in ranks), "each rank must own some shards"
    assert computed(stdout) == list(range(N_IMAGES // 2))  # disjoint, together complete
    assert tree(out) == tree(reference)


def test_changed_params_refuse_the_existing_store(setup, reference):
    out = setup / "changed"
    shutil.copytree(reference, out)
    write_params(setup / "params2.yaml", extract={**EXTRACT, "noise_seed": 1})
    with pytest.raises(StoreError, match="noise_seed: stored 0 != expected 1"):
        extract_in_process(setup, out, setup / "params2.yaml")
    assert FeatureStore.open(out).is_complete()
    assert extract_in_process(setup, out, setup / "params.yaml") == []  # complete: left alone


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
           str(setup / "model"), str(out), "--params", str(setup / "params.yaml")]  # fmt: skip
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
