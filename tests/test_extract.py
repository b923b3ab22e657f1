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

from pipeline.cache.store import FeatureStore, values_name, writer_lock
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
    """The stage's command line as dvc.yaml gives it, writing `out` (a folder named t50)."""
    assert out.name == "t50"
    script = [str(ROOT / "stages" / "extract.py")]
    args = [
        "--timestep",
        "50",
        str(root / "encoded"),
        str(root / "trajectories"),
        str(root / "model"),
        str(out.parent),
        str(out.parent / "metrics"),
    ]
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
        results = extract.run(
            cfg,
            read_group(p, "model", ModelConfig),
            50,
            root / "encoded",
            root / "trajectories",
            root / "model",
            out,
            root / "extract.json",
        )
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
    out = setup / "killed" / "t50"
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
    shard_file = out / "game" / "features" / "up0_res0" / "values" / "c"
    inodes = {s: (shard_file / str(s) / "0/0/0/0").stat().st_ino for s in done}

    # The rerun in-process (same code path as the stage, minus ~10 s of imports).
    assert extract_in_process(setup, out, setup / "params.yaml") == {**ALL, "game": missing}
    assert {s: (shard_file / str(s) / "0/0/0/0").stat().st_ino for s in done} == inodes
    assert FeatureStore.open(out / "game").is_complete()
    assert tree(out) == tree(reference)  # bit for bit, metadata included


def test_torchrun_two_ranks_equal_single_process(setup, reference):
    out = setup / "torchrun" / "t50"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    stdout = run(extract_cmd(setup, out, *torchrun))
    ranks = re.findall(r"rank (\d): game: computed shards \[([\d, ]*)\]", stdout)
    assert sorted(r for r, _ in ranks) == ["0", "1"]
    assert all(s.strip() for _, s in ranks), "each rank must own some shards"
    assert computed(stdout) == ALL  # disjoint, together complete
    assert tree(out) == tree(reference)


def test_changed_params_refuse_the_existing_store(setup, reference):
    out = setup / "changed" / "t50"
    shutil.copytree(reference, out)
    write_params(setup / "params2.yaml", extract={**EXTRACT, "noise_seed": 1})
    with pytest.raises(StoreError, match="noise_seed: stored 0 != expected 1"):
        extract_in_process(setup, out, setup / "params2.yaml")
    assert FeatureStore.open(out / "game").is_complete()
    # complete: left alone
    assert extract_in_process(setup, out, setup / "params.yaml") == {"game": [], "real": []}
    # As dvc.yaml runs it (DVC's cache holds the old version): other settings are replaced,
    # and the store of a domain no longer listed goes.
    shutil.copytree(out / "real", out / "gone")
    cmd = extract_cmd(setup, out)
    cmd[-1] = str(setup / "params2.yaml")
    stdout = run([*cmd, "--replace-stale"])
    assert computed(stdout) == ALL and not (out / "gone").exists()
    assert FeatureStore.open(out / "game").identity.noise_seed == 1


def test_verify_then_delete_then_rerun_repairs_the_store_bit_for_bit(setup, reference):
    out = setup / "repaired"
    shutil.copytree(reference, out)
    store = FeatureStore.open(out / "game")
    bad = [
        store.array_files(values_name("up1_attn0")).shard_file((3, 0, 0, 0, 0)),
        store.array_files(values_name("up0_res0")).shard_file((6, 0, 0, 0, 0)),
    ]
    for path in bad:
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 1  # one bit
        path.write_bytes(bytes(data))
    cli = [sys.executable, "-m", "pipeline.cache.verify", str(out)]
    proc = subprocess.run(cli, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    listed = [line.split(": ", 1)[0] for line in proc.stdout.splitlines() if line.startswith("/")]
    assert listed == [str(p) for p in bad]
    proc = subprocess.run([*cli, "--delete"], env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and not any(p.exists() for p in bad)
    # Every file hard-linked elsewhere, as DVC's hardlink cache does: the repair must replace
    # files, never write into one, or the linked copies would change too.
    links = setup / "links-repaired"
    for p in out.rglob("*"):
        if p.is_file():
            (links / p.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            os.link(p, links / p.relative_to(out))
    linked = tree(links)
    assert extract_in_process(setup, out, setup / "params.yaml") == {"game": [3, 6], "real": []}
    assert tree(out) == tree(reference)
    assert tree(links) == linked
    ok = subprocess.run(cli, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and f"checked {out}: 0 problems" in ok.stdout, ok.stdout


def test_resume_checks_what_it_keeps_and_recomputes_bad_shards(setup, reference):
    """A flipped byte or a truncation inside a kept shard: the rerun finds it (index and chunk
    checksums of every done shard) and recomputes it, so `dvc repro` never records a store that
    `verify` rejects; damaged metadata (a zarr.json, the done mask) recreates the store."""
    out = setup / "resumed"
    shutil.copytree(reference, out)
    store = FeatureStore.open(out / "game")
    flipped = store.array_files(values_name("up1_attn0")).shard_file((2, 0, 0, 0, 0))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 1
    flipped.write_bytes(bytes(data))
    cut = store.array_files(values_name("up0_res1")).shard_file((5, 0, 0, 0, 0))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert extract_in_process(setup, out, setup / "params.yaml") == {"game": [2, 5], "real": []}
    assert tree(out) == tree(reference)
    for damaged in (
        out / "real" / "zarr.json",
        out / "real" / "features/up0_res0/values/zarr.json",
        out / "real" / "done" / "c" / "0",
    ):
        damaged.write_bytes(damaged.read_bytes()[:-7] + b"garbage")
        computed = extract_in_process(setup, out, setup / "params.yaml")
        assert computed["real"] == list(range(FeatureStore.open(out / "real").n_shards)), damaged
        assert tree(out) == tree(reference)


def test_a_second_writer_gets_one_clear_line(setup, reference):
    out = setup / "locked" / "t50"
    shutil.copytree(reference, out)
    with writer_lock(out):  # as a running extract holds it
        proc = subprocess.run(
            extract_cmd(setup, out), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"extract: error: {out}: another process is writing these feature stores; wait for it "
        "to finish (or stop it), then rerun"
    )
    assert tree(out) == tree(reference)


def test_full_disk_is_one_clear_error_and_a_rerun_finishes_the_store(setup, reference, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    # What game's files take in 4 KiB pages (tmpfs counts pages, not bytes).
    need = sum(
        -(-p.stat().st_size // 4096) * 4096 for p in (reference / "game").rglob("*") if p.is_file()
    )
    # Room for about half of game's shards: the store's metadata, then some shards.
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={need // 2}", "tmpfs", str(mount)],
        capture_output=True,
    ).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    try:
        out = mount / "t50"
        with pytest.raises(StoreError) as err:
            extract_in_process(setup, out, setup / "params.yaml")
        msg = str(err.value)
        assert msg.startswith(f"{out / 'game'}: disk full") and "MB are free" in msg
        assert "shards (about" in msg and "\n" not in msg
        assert not list(out.rglob("*.partial"))  # no half-written shard left
        done = FeatureStore.open(out / "game").done_mask()
        assert done.any() and not done.all()
        subprocess.run(["mount", "-o", f"remount,size={4 * need}", str(mount)], check=True)
        redo = extract_in_process(setup, out, setup / "params.yaml")
        assert redo["game"] == [int(i) for i in (~done).nonzero()[0]]
        assert tree(out) == tree(reference)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize(
    "timestep,message",
    [
        ("-5", r"--timestep '-5': not one of .*p1000.yaml's timesteps \[50, 1000\]"),
        ("50.0", r"--timestep '50.0': not one of .*p1000.yaml's timesteps"),
        ("50; touch pwned", r"--timestep '50; touch pwned': not one of .*p1000.yaml's timesteps"),
        ("1000", r"timesteps: 1000 is outside 0..999, the range of this model's scheduler"),
    ],
)
def test_bad_timestep_is_one_line_and_leaves_nothing(setup, timestep, message):
    """What dvc.yaml passes is checked before use: a value of `timesteps` that only the stage
    sees (`dvc repro -s` skips check_params) is one line, and no shell ever reads it."""
    features = setup / f"bad{timestep}"
    params = write_params(setup / "p1000.yaml", extract=EXTRACT, timesteps=[50, 1000])
    cmd = extract_cmd(setup, features / "t50")
    cmd[cmd.index("--timestep") + 1] = timestep
    cmd[-1] = str(params)
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(message, last) and last.startswith("extract: error: "), proc.stderr
    assert not features.exists()


def test_pca_wider_than_a_tap_is_refused_before_work(setup):
    out = setup / "pca"
    with pytest.raises(ConfigError, match=r"extract.storage pca-99999: .*up0_res0 \(16\)"):
        extract_in_process(
            setup, out, write_params(setup / "p3.yaml", extract={**EXTRACT, "storage": "pca-99999"})
        )
    assert not out.exists()
