"""Extraction: SIGKILL + resume equals an uninterrupted run; torchrun ranks equal one process."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    PARAMS,
    STORE_MODEL,
    make_encoded,
    shard_mb,
    store_model,
    tiny_model,
    write_params,
)

from pipeline.cache.store import FeatureStore, digest_path, writer_lock
from pipeline.core.errors import ConfigError, StoreError
from pipeline.core.params import load_params, read_group
from pipeline.diffusion.build import ModelConfig
from pipeline.loops import extract

ROOT = Path(__file__).resolve().parents[1]
# Single-threaded torch: the test machine's cores are shared, and OpenMP spin-waits there.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
N_IMAGES = 24  # 16 source (game) images, 8 target (real) ones
# Shards of 2 images: 8 of the source, 4 of the target.
EXTRACT = {**PARAMS["extract"], "batch_size": 2, "shard_mb": shard_mb(2, tiny_model(**STORE_MODEL))}


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
            digest=str(digest_path(out.parent, 50)),
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
    first_done = out / "game" / "done" / "c.0"
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
    files = store.tap_file("up0_res0")
    inodes = {s: files.shard_file((s, 0, 0, 0, 0, 0)).stat().st_ino for s in done}

    # The rerun in-process (same code path as the stage, minus ~10 s of imports).
    assert extract_in_process(setup, out, setup / "params.yaml") == {**ALL, "game": missing}
    assert {s: files.shard_file((s, 0, 0, 0, 0, 0)).stat().st_ino for s in done} == inodes
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(setup: Path, out: Path) -> list[subprocess.Popen]:
    """Two torchrun agents, one rank each, meeting at a c10d rendezvous on 127.0.0.1: two
    nodes of a multi-node job as `torchrun --nnodes=2` starts them on each machine."""
    torchrun = [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"),
        *("--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"),
        f"--rdzv-id={out.parent.name}",
    ]
    return [
        subprocess.Popen(
            extract_cmd(setup, out, *torchrun),
            env=ENV,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]


def kill_trees(pids: list[int]) -> None:
    """SIGKILL processes and all their descendants at once, found from /proc (torchrun starts
    each worker in a session of its own, so an agent's process group does not hold them): the
    power cut of a node. Frozen first, so none writes on while the others are killed."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    tree_ = set(pids)
    while True:
        more = {p for p, ppid in parents.items() if ppid in tree_} - tree_
        if not more:
            break
        tree_ |= more
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in tree_:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def test_torchrun_two_nodes_c10d_equal_single_process(setup, reference):
    out = setup / "nodes" / "t50"
    agents = two_nodes(setup, out)
    stdout = "".join(a.communicate(timeout=240)[0] for a in agents)
    assert [a.returncode for a in agents] == [0, 0], stdout[-3000:]
    ranks = re.findall(r"rank (\d): game: computed shards \[([\d, ]*)\]", stdout)
    assert sorted(r for r, _ in ranks) == ["0", "1"] and all(s.strip() for _, s in ranks)
    assert computed(stdout) == ALL  # disjoint, together complete
    assert tree(out) == tree(reference)
    # The digest later stages depend on: the same stores, the same bytes.
    assert (
        digest_path(out.parent, 50).read_bytes() == digest_path(reference.parent, 50).read_bytes()
    )


def array_task(setup: Path, out: Path, task: int, tasks: int) -> subprocess.Popen:
    """One task of a Slurm job array (`sbatch --array=0-<tasks-1>`), its variables set by hand."""
    env = {**ENV, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(tasks)}
    env["SLURM_ARRAY_TASK_MIN"] = "0"
    return subprocess.Popen(
        extract_cmd(setup, out), env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True
    )


def test_a_node_killed_mid_extraction_is_finished_by_an_array_of_another_size(setup, reference):
    """Two torchrun nodes; one dies (SIGKILL to its agent and worker) after the first shards are
    written, and the job with it. verify calls the stores incomplete; three Slurm array tasks
    finish them, each owning a fixed share; the result is byte-identical to one process."""
    out = setup / "died" / "t50"
    agents = two_nodes(setup, out)
    done = out / "game" / "done"
    deadline = time.monotonic() + 180
    while not any(done.glob("c.*")) and time.monotonic() < deadline:
        assert all(a.poll() is None for a in agents), "the job ended before a node could die"
        time.sleep(0.01)
    kill_trees([a.pid for a in agents])  # a node dies; its job is cancelled (the other waits)
    for agent in agents:
        agent.wait()
    assert FeatureStore.open(out / "game").done_mask().any()
    verify = [sys.executable, "-m", "pipeline.cache.verify", str(out)]
    checked = subprocess.run(verify, env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert checked.returncode == 1 and "incomplete" in checked.stdout, checked.stdout
    # Before an array: one run creates what the job had not yet (the target's store), removes
    # partial files and checks every kept shard.
    create = run([*extract_cmd(setup, out), "--create-only"])
    assert computed(create) == {"game": [], "real": []}
    missing = {name: FeatureStore.open(out / name).missing_shards() for name in ("game", "real")}
    assert missing["real"], missing  # the job died mid-extraction
    tasks = [array_task(setup, out, i, 3) for i in range(3)]
    stdout = "".join(t.communicate(timeout=240)[0] for t in tasks)
    assert [t.returncode for t in tasks] == [0, 0, 0], stdout[-3000:]
    got = computed(stdout)
    assert {k: got.get(k, []) for k in missing} == missing  # only what was left, each shard once
    for task, name, shards in re.findall(
        r"rank (\d): (\w+): computed shards \[([\d, ]*)\]", stdout
    ):
        assert all(int(s) % 3 == int(task) for s in shards.split(",") if s.strip()), name
    assert tree(out) == tree(reference)


def test_array_tasks_need_the_store_made_first(setup):
    out = setup / "uncreated" / "t50"
    proc = array_task(setup, out, 0, 2)
    proc.communicate(timeout=120)
    assert proc.returncode == 1 and not (out / "game").exists()


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
        store.tap_file("up1_attn0").shard_file((3, 0, 0, 0, 0, 0)),
        store.tap_file("up0_res0").shard_file((6, 0, 0, 0, 0, 0)),
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
    flipped = store.tap_file("up1_attn0").shard_file((2, 0, 0, 0, 0, 0))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 1
    flipped.write_bytes(bytes(data))
    cut = store.tap_file("up0_res1").shard_file((5, 0, 0, 0, 0, 0))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert extract_in_process(setup, out, setup / "params.yaml") == {"game": [2, 5], "real": []}
    assert tree(out) == tree(reference)
    for damaged in (
        out / "real" / "zarr.json",
        FeatureStore.open(out / "real").tap_file("up0_res0").path / "zarr.json",
        out / "real" / "done" / "c.0",
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
