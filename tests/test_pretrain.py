"""Pretraining the small model: the loss falls, the folder loads as SD does, the stages run end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from helpers import TINY, config, tiny_model, write_params
from PIL import Image

from pipeline.data.datasets import DataConfig
from pipeline.data.synthetic import SceneGenerator
from pipeline.diffusion.model import load_diffusion_model
from pipeline.loops.pretrain import (
    PretrainConfig,
    captions_for,
    fresh_scenes,
    masked_patches,
    pretrain,
    sample,
)

ROOT = Path(__file__).resolve().parents[1]


def _images(n: int, h: int = 32, w: int = 64) -> torch.Tensor:
    # Simple scenes: sky above a road-colored band, tinted per image, easy to learn quickly.
    rng = np.random.default_rng(0)
    out = np.zeros((n, 3, h, w), dtype=np.uint8)
    for i in range(n):
        horizon = rng.integers(h // 3, 2 * h // 3)
        out[i, :, :horizon] = rng.integers(100, 255, 3)[:, None, None]
        out[i, :, horizon:] = rng.integers(0, 100, 3)[:, None, None]
    return torch.from_numpy(out)


def test_captions_name_scene_and_condition() -> None:
    assert "night" in captions_for("night")[1] and "street" in captions_for("night")[1]
    assert captions_for("game")[0] == "a street scene, video game"
    assert captions_for("dusk") == ("a street scene, dusk",)


def test_pretrain_loss_decreases() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    images = _images(16)
    domains = ["game", "fog"] * 8
    cfg = config(
        "pretrain",
        PretrainConfig,
        steps=30,
        batch_size=8,
        lr=2e-3,
        vae_steps=30,
        vae_batch_size=8,
        vae_lr=3e-3,
        vae_crop=32,
        warmup=5,
    )
    log = pretrain(model, images, domains, cfg)
    assert len(log.vae_loss) == 30 and len(log.unet_loss) == 30
    assert np.mean(log.vae_loss[-5:]) < 0.7 * np.mean(log.vae_loss[:5])
    assert np.mean(log.unet_loss[-10:]) < np.mean(log.unet_loss[:10])
    # Latents are rescaled to unit variance, as SD's scaling factor does.
    assert model.vae.config.scaling_factor != 0.18215
    assert not model.unet.training and not any(p.requires_grad for p in model.unet.parameters())
    out = sample(model, ["a street scene, in fog", ""], (4, 8), steps=2, guidance=3.0, seed=0)
    assert out.shape == (2, 3, 32, 64) and out.dtype == torch.uint8


def test_masked_objective_learns_to_fill_hidden_patches() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    images = _images(16)
    cfg = config(
        "pretrain",
        PretrainConfig,
        steps=40,
        batch_size=8,
        lr=2e-3,
        vae_steps=0,
        warmup=5,
        objective="masked",
    )
    log = pretrain(model, images, ["game"] * 16, cfg)
    assert np.mean(log.unet_loss[-10:]) < 0.8 * np.mean(log.unet_loss[:10])
    keep = masked_patches(torch.Size((4, 4, 8, 16)), torch.Generator().manual_seed(0))
    assert keep.shape == (4, 1, 8, 16) and 0.15 < keep.mean() < 0.35  # 75 % hidden
    assert torch.equal(keep[..., ::2, ::2], keep[..., 1::2, 1::2])  # whole 2x2 cells


def test_fresh_scenes_follow_the_domain_mix_and_are_new() -> None:
    synthetic = config("data", DataConfig).synthetic
    images, domains = fresh_scenes(10, ["game"] * 6 + ["fog"] * 4, synthetic, [64, 128])
    assert images.shape == (10, 3, 64, 128) and images.dtype == torch.uint8
    assert domains.count("game") == 6 and domains.count("fog") == 4
    bench = SceneGenerator(synthetic.height, synthetic.width, synthetic.seed)
    train0 = bench.sample(0, "game", "train")[1]
    assert not np.array_equal(
        SceneGenerator(synthetic.height, synthetic.width, synthetic.seed).sample(
            0, "game", "pretrain"
        )[1],
        train0,
    )


def _fake_project(tmp: Path) -> None:
    write_params(
        tmp / "params.yaml",
        model={"small": TINY},
        pretrain={
            "steps": 3,
            "batch_size": 4,
            "vae_steps": 2,
            "vae_batch_size": 2,
            "vae_crop": 32,
            "sample_steps": 2,
            "samples_per_caption": 1,
            "threads": 2,
            "resolution": [32, 64],
        },
    )
    images = _images(6).permute(0, 2, 3, 1).numpy()
    (tmp / "data" / "manifests").mkdir(parents=True)
    for d, domain in enumerate(("game", "night")):
        rows = []
        for i in range(3):
            path = Path("data/img") / f"{domain}_{i}.png"
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[3 * d + i]).save(tmp / path)
            rows.append(
                dict(
                    image=str(path),
                    label=str(path),
                    domain=domain,
                    split="val",
                    height=32,
                    width=64,
                    sha256=f"{d}{i}",
                    label_sha256=f"{d}{i}",
                )
            )
        pd.DataFrame(rows).to_parquet(tmp / "data" / "manifests" / f"{domain}.parquet")


BUILD = ["data/model_init"]
PRETRAIN = [
    "data/model_init",
    "data/manifests",
    "data/model",
    "metrics/pretrain.json",
    "plots/pretrain",
    "dvclive/pretrain",
]


def _stage(name: str, cwd: Path, *args: str, omp: str = "1") -> subprocess.CompletedProcess:
    # One thread: on a shared, busy CPU, OpenMP spin-waiting makes tiny models crawl.
    env = {**os.environ, "OMP_NUM_THREADS": omp}
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / f"{name}.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_stages_build_and_pretrain(tmp_path: Path) -> None:
    _fake_project(tmp_path)
    assert _stage("build_model", tmp_path, *BUILD).returncode == 0
    run = _stage("pretrain", tmp_path, *PRETRAIN)
    assert run.returncode == 0, run.stderr[-2000:]
    model = load_diffusion_model(tmp_path / "data" / "model")
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == 3 and metrics["images"] == 6
    assert metrics["fingerprint"] == model.fingerprint
    assert model.fingerprint != load_diffusion_model(tmp_path / "data" / "model_init").fingerprint
    loss = pd.read_csv(tmp_path / "dvclive/pretrain/plots/metrics/loss.tsv", sep="\t")
    assert list(loss.columns) == ["step", "loss"] and list(loss["step"]) == [0, 1, 2]
    assert Image.open(tmp_path / "plots" / "pretrain" / "samples.png").size[0] > 100
    # pretrain.threads, not the environment, sets the thread count, and two threads give the
    # same weights every run (text-encoder gradients once summed with atomics: not so).
    again = _stage(
        "pretrain",
        tmp_path,
        "data/model_init",
        "data/manifests",
        "data/model2",
        "m2.json",
        "plots2",
        "live2",
        omp="2",
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert load_diffusion_model(tmp_path / "data" / "model2").fingerprint == model.fingerprint
    # model.source = a local folder: build_model writes a pointer, pretrain passes it through.
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    shutil.copytree(tmp_path / "data" / "model", tmp_path / "external")
    params["model"]["source"] = str(tmp_path / "external")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert _stage("build_model", tmp_path, *BUILD).returncode == 0
    assert (tmp_path / "data" / "model_init" / "pointer.json").is_file()
    assert _stage("pretrain", tmp_path, *PRETRAIN).returncode == 0
    assert load_diffusion_model(tmp_path / "data" / "model").fingerprint == model.fingerprint
    # Nothing logged, yet the declared dvclive outputs exist (DVC fails a stage without them).
    assert (tmp_path / "dvclive/pretrain/plots").is_dir()
    assert (tmp_path / "dvclive/pretrain/metrics.json").is_file()
