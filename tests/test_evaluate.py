import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _synthetic_features import SPECS, SyntheticFeatures, train_data
from helpers import config, identity, loader, sampling, write_params
from PIL import Image

from pipeline.cache.encoded import (
    LABELS_NAME,
    create_rows_array,
    index_fingerprint,
    read_index,
    set_index,
    write_index,
)
from pipeline.cache.preload import MemoryReader
from pipeline.cache.reader import FeatureReader
from pipeline.cache.store import FeatureStore, store_path
from pipeline.core.classes import CLASSES, colorize
from pipeline.data.pixel_reader import PIXEL_KEY, PixelReader
from pipeline.data.sampling import pixel_counts
from pipeline.heads.inference import Inference, predict_logits
from pipeline.loops.evaluate import EvalConfig, evaluate_domains
from pipeline.loops.train import TrainConfig, build_model, train

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 128)
DOMAINS = {"game": {"train": 16, "val": 4}, "fog": {"val": 4}, "night": {"val": 4}}


def tiny_model(kind="stride"):
    torch.manual_seed(0)
    cfg = config("train", TrainConfig, fusion=kind, widths=[8, 16, 32, 64], embed_dim=16)
    return build_model(cfg, SPECS).eval()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A real data/encoded + data/features/t50,t150/<domain> (zarr stores) + images and labels,
    from synthetic features. Fog's labels are at twice the canvas size (scored there)."""
    root = tmp_path_factory.mktemp("project")
    rows, per_domain = [], {}
    for d, splits in DOMAINS.items():
        samples = []
        for split, n in splits.items():
            ds = SyntheticFeatures(n, SIZE, seed=len(rows) + 7)
            for i, s in enumerate(ds.samples):
                label = s.label.numpy().astype(np.uint8)
                if d == "fog":  # an original label at 2x the canvas (as Cityscapes' 2048x1024)
                    label = label.repeat(2, 0).repeat(2, 1)
                img = colorize(label)
                if d != "game":  # another "look": darker, noisier
                    img = (img * 0.5).astype(np.uint8)
                p = root / "images" / d / f"{split}_{i:05d}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(p)
                lp = p.with_name(f"{split}_{i:05d}_label.png")
                Image.fromarray(label, mode="L").save(lp)
                rows.append(
                    dict(
                        domain=d,
                        split=split,
                        image=str(p),
                        label=str(lp),
                        sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
                        label_sha256=hashlib.sha256(lp.read_bytes()).hexdigest(),
                        height=label.shape[0],
                        width=label.shape[1],
                        set=d,
                        row=len(samples),
                        canvas_h=SIZE[0],
                        canvas_w=SIZE[1],
                        content_h=SIZE[0],
                        content_w=SIZE[1],
                        class_pixels=pixel_counts(label),
                    )
                )
                samples.append(s)
        per_domain[d] = samples
    index = pd.DataFrame(rows)
    enc = root / "encoded"
    enc.mkdir()
    write_index(index, enc)
    for d, samples in per_domain.items():
        (enc / d).mkdir()
        labels = create_rows_array(
            enc / d / LABELS_NAME, (len(samples), *SIZE), "uint8", {"resolution": list(SIZE)}
        )
        labels[:] = np.stack([s.label.numpy().astype(np.uint8) for s in samples])
        shas = index[index["domain"] == d]["sha256"]
        for t in (50, 150):
            taps = sorted({k.split("/")[1] for k in SPECS if k.startswith(f"t{t}/")})
            ident = identity(
                taps=tuple(taps), timestep=t, images=index_fingerprint(shas), resolution=SIZE
            )
            shapes = {
                tap: (
                    SPECS[f"t{t}/{tap}"][0],
                    SIZE[0] // SPECS[f"t{t}/{tap}"][1],
                    SIZE[1] // SPECS[f"t{t}/{tap}"][1],
                )
                for tap in taps
            }
            strides = {tap: SPECS[f"t{t}/{tap}"][1] for tap in taps}
            path = store_path(root / "features", t, d)
            store = FeatureStore.create(path, ident, len(samples), shapes, strides, 4)
            for shard in range(store.n_shards):
                a_, b_ = store.shard_range(shard)
                store.write_shard(
                    shard,
                    {
                        tap: np.stack(
                            [
                                samples[i].features[f"t{t}/{tap}"].numpy()[None]
                                for i in range(a_, b_)
                            ]
                        )
                        for tap in taps
                    },
                )
    write_params(
        root / "params.yaml",
        timesteps=[50, 150],
        train=dict(
            widths=[8, 16, 32, 64],
            embed_dim=16,
            iterations=30,
            batch_size=4,
            lr=3e-3,
            head_lr_mult=3.0,
            warmup=5,
            log_interval=5,
            eval_interval=15,
            checkpoint_interval=10,
            device="cpu",
        ),
        sampling={"feature_crop": [32, 64]},
        evaluate={
            "mode": "slide",
            "window": [64, 64],
            "window_stride": [32, 32],
            "overlays": 2,
            "device": "cpu",
        },
    )
    return root


def run_stage(name, root, *paths):
    args = [
        sys.executable,
        str(ROOT / "stages" / f"{name}.py"),
        *map(str, paths),
        "--params",
        str(root / "params.yaml"),
    ]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1"}
    out = subprocess.run(args, cwd=root, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_slide_with_one_full_window_equals_whole():
    model = tiny_model()
    sample = SyntheticFeatures(2, SIZE, seed=3)
    feats = {k: torch.stack([s.features[k] for s in sample.samples]) for k in SPECS}
    with torch.no_grad():
        whole = predict_logits(model, feats, SIZE, Inference("whole", None, None, 2, 0, 2))
        one = predict_logits(model, feats, SIZE, Inference("slide", [64, 128], [64, 128], 2, 0, 2))
        many = predict_logits(model, feats, SIZE, Inference("slide", [64, 64], [32, 32], 2, 0, 2))
    assert torch.allclose(whole, one, atol=1e-5)
    assert many.shape == whole.shape and torch.isfinite(many).all()


def test_evaluate_domains_gives_the_contract():
    model = tiny_model("hyperfeatures")
    data = {"game": SyntheticFeatures(3, SIZE, seed=4), "fog": SyntheticFeatures(2, SIZE, seed=5)}
    cfg = config("evaluate", EvalConfig, overlays=2, batch_size=2)
    results = evaluate_domains(model, data, cfg, loader(), progress=False)
    scores = {name: r.scores for name, r in results.items()}
    assert list(scores) == ["game", "fog"]
    for s in scores.values():
        assert set(s) == {"mIoU", "aAcc", "IoU"} and list(s["IoU"]) == list(CLASSES)
        assert 0 <= s["aAcc"] <= 100
    assert len(results["fog"].samples) == 2 and results["fog"].samples[0]["pred"].shape == SIZE
    assert results["game"].confusion.sum() == sum(
        int((x.label != 255).sum()) for x in data["game"].samples
    )


def test_train_and_evaluate_stages_write_contract_outputs(project):
    run_stage(
        "train",
        project,
        "encoded",
        "features",
        "heads",
        "train_checkpoint",
        "metrics/train.json",
        "plots/train",
        "dvclive/train",
    )
    train_metrics = json.loads((project / "metrics" / "train.json").read_text())
    assert train_metrics["iterations"] == 30 and train_metrics["seconds"] > 0
    live = json.loads((project / "dvclive" / "train" / "metrics.json").read_text())
    assert live["step"] == 30 and live["val"]["mIoU"] > 30  # dvclive's summary: the last values
    assert (project / "heads" / "model.safetensors").exists()
    assert not (project / "train_checkpoint" / "checkpoint").exists()  # removed once trained
    curves = project / "dvclive" / "train" / "plots" / "metrics"
    curve = pd.read_csv(curves / "loss.tsv", sep="\t")
    assert (
        list(curve.columns) == ["step", "loss"] and curve["loss"].iloc[-1] < curve["loss"].iloc[0]
    )
    assert list(pd.read_csv(curves / "val" / "mIoU.tsv", sep="\t")["step"]) == [15, 30]

    run_stage(
        "evaluate",
        project,
        "encoded",
        "features",
        "heads",
        "metrics/evaluate.json",
        "metrics/scores.json",
        "plots/evaluate",
        "predictions",
    )
    scores = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert list(scores) == ["game", "fog", "night"]
    brief = json.loads((project / "metrics" / "scores.json").read_text())
    assert brief == {d: {"mIoU": s["mIoU"], "aAcc": s["aAcc"]} for d, s in scores.items()}
    for s in scores.values():
        assert set(s) == {"mIoU", "aAcc", "IoU"} and list(s["IoU"]) == list(CLASSES)
        present = [v for v in s["IoU"].values() if v is not None]
        assert s["mIoU"] == pytest.approx(np.mean(present), abs=1e-3)
        assert (
            s["IoU"]["train"] is None
        )  # class 16 never occurs nor is predicted... if predicted it is 0.0
    assert scores["game"]["mIoU"] > 30
    for d in DOMAINS:
        iou = pd.read_csv(project / "plots" / "evaluate" / "iou" / f"{d}.csv")
        assert set(iou["domain"]) == {d} and len(iou) == sum(
            v is not None for v in scores[d]["IoU"].values()
        )
    figs = {p.name for p in (project / "plots" / "evaluate" / "figures").iterdir()}
    for d in DOMAINS:
        assert {f"confusion_{d}.png", f"overlays_{d}.png"} <= figs
    assert "iou.png" in figs


def test_preload_equals_per_sample_reads(project):
    paths = [store_path(project / "features", t, "game") for t in (50, 150)]
    reader = FeatureReader(paths, encoded_dir=project / "encoded", set_name="game")
    rows = [0, 1, 2, 5, 6, 19]
    mem = MemoryReader(reader, rows, [0], progress=False)
    for r in rows:
        assert torch.equal(reader.label(r), mem.label(r))
        a, b = reader.features(r), mem.features(r)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pixel_baseline_trains_from_images(project, tmp_path):
    index = set_index(read_index(project / "encoded"), "game")
    rows = [i for i in range(len(index)) if index.iloc[i]["split"] == "train"]
    reader = PixelReader(index, SIZE)
    image, label = reader.features(rows[0])[PIXEL_KEY], reader.label(rows[0])
    assert image.shape == (3, *SIZE) and label.shape == SIZE
    np.testing.assert_array_equal(label.numpy(), np.array(Image.open(index.iloc[rows[0]]["label"])))
    cfg = config(
        "train",
        TrainConfig,
        features="pixels",
        widths=[8, 16, 32, 64],
        embed_dim=16,
        iterations=60,
        batch_size=4,
        lr=3e-3,
        head_lr_mult=1.0,
        warmup=3,
        log_interval=5,
    )
    data = train_data(reader)
    data.rows = rows
    data.class_pixels = data.class_pixels[rows]
    res = train(cfg, sampling(feature_crop=[32, 64]), loader(), data, tmp_path, progress=False)
    assert res.model.fusion_config.kind == "pixels"
    assert res.curve[-1]["loss"] < 0.8 * res.curve[0]["loss"]
