"""DDP head training: `train.processes: 2` (two torchrun ranks, gloo) matches one process at the
same global batch, each rank reading its own samples from the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import config, extract, make_encoded, shard_mb, store_model, write_params
from safetensors.torch import load_file

from pipeline.core.device import claim_gpu
from pipeline.loops.extract import ExtractConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
TRAIN = dict(
    iterations=6,
    batch_size=4,
    widths=[8, 8, 8, 8],
    embed_dim=8,
    hyper_channels=8,
    dropout=0.0,
    head_norm="gn",
    eval_interval=0,
    log_interval=1,
    checkpoint_interval=3,
    device="cpu",
    threads=1,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    model = store_model(root / "model")
    make_encoded(root / "data" / "encoded", model, 12)
    cfg = config("extract", ExtractConfig, batch_size=4, shard_mb=shard_mb(4, model))
    for domain in ("game", "real"):
        extract(
            model,
            root / "data" / "encoded",
            50,
            root / "data" / "features" / "t50" / domain,
            cfg,
            domain,
        )
    return root


def train_stage(root: Path, name: str, processes: int) -> tuple[dict, list[float], str]:
    """stages/train.py as dvc.yaml runs it; returns the head's weights and the loss curve."""
    params = write_params(
        root / f"{name}.yaml",
        timesteps=[50],
        train={**TRAIN, "processes": processes},
        sampling={"feature_crop": [32, 32], "rare_class_sampling": False},
    )
    out, metrics, plots = root / name, root / f"{name}.json", root / f"plots-{name}"
    live = root / f"live-{name}"
    cmd = [
        sys.executable,
        str(ROOT / "stages" / "train.py"),
        "data/encoded",
        "data/features",
        str(out),
        str(root / f"checkpoint-{name}"),
        str(metrics),
        str(plots),
        str(live),
        "--params",
        str(params),
    ]
    proc = subprocess.run(cmd, cwd=root, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(metrics.read_text())["processes"] == processes
    curve = (live / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    losses = [float(r.split("\t")[1]) for r in curve]
    return load_file(str(out / "model.safetensors")), losses, proc.stdout


def test_two_ranks_match_one_process_at_the_same_global_batch(project: Path) -> None:
    one, curve1, _ = train_stage(project, "one", 1)
    two, curve2, stdout = train_stage(project, "two", 2)
    assert "train split (rank 1)" in stdout  # the second rank read the store itself
    assert len(curve1) == 6 and curve1[-1] < curve1[0]  # it trained
    assert one.keys() == two.keys()
    # The same samples and crops per step; gradients averaged over the two halves of each batch
    # equal the whole batch's up to each half's share of valid pixels and float order.
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-3, atol=1e-4), k
    assert curve1 == pytest.approx(curve2, rel=1e-3)


def test_cuda_free_gives_each_claimer_its_own_gpu(tmp_path: Path) -> None:
    """How N queue workers share N GPUs: each stage claims one no other holds, or waits."""
    assert claim_gpu(2, tmp_path) == 0
    code = (
        "import sys; from pipeline.core.device import claim_gpu; "
        f"print(claim_gpu(2, {str(tmp_path)!r}))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert other.stdout.strip() == "1"  # GPU 0 is held here; released when its holder exits
    again = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert again.stdout.strip() == "1"
    waiting = subprocess.Popen(
        [sys.executable, "-c", code.replace("(2,", "(1,")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        out, _ = waiting.communicate(timeout=8)
    except subprocess.TimeoutExpired:
        waiting.kill()
        out, _ = waiting.communicate()
    assert "all 1 GPUs are claimed" in out and waiting.returncode != 0
    # cuda:free:<seconds> bounds the wait: one line naming the key, not a hung queue worker.
    bounded = (
        "from pipeline.core.device import claim_gpu; "
        f"claim_gpu(1, {str(tmp_path)!r}, wait_s=0.1, timeout_s=1, key='train.device')"
    )
    timed = subprocess.run(
        [sys.executable, "-c", bounded], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert timed.returncode != 0
    assert "train.device cuda:free: all 1 GPUs stayed claimed by other stages for 1 s" in (
        timed.stderr
    )
