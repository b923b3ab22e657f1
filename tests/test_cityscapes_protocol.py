"""The field's evaluation protocol on a tiny Cityscapes tree at its real size (2048x1024):
logits upsampled to the original labels and scored there; the exported labelIds PNGs give
cityscapesscripts' own evaluation the same scores as metrics/evaluate.json."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
from helpers import (
    config,
    fusion_config,
    head_config,
    loader,
    shard_mb,
    store_model,
    write_params,
)
from PIL import Image
from sklearn.metrics import confusion_matrix

from pipeline.cache.encoded import read_index, set_index
from pipeline.cache.reader import FeatureReader, tap_specs
from pipeline.cache.store import store_path
from pipeline.core.classes import CLASSES, IGNORE_INDEX, LABEL_ID_TO_TRAIN_ID, NUM_CLASSES
from pipeline.core.errors import ConfigError
from pipeline.core.params import load_params, read_group
from pipeline.data.datasets import DataConfig
from pipeline.data.sampling import SamplingConfig
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.prompts import PromptConfig
from pipeline.heads.blocks import resize
from pipeline.heads.seg_model import SegModel
from pipeline.loops import encode, evaluate, extract, invert, prepare
from pipeline.loops.evaluate import EvalConfig

CITIES = {"aachen": 2, "bochum": 1}
CS_LABEL_IDS = [7, 8, 11, 13, 17, 21, 23, 24, 26, 0, 4]  # a few classes, unlabeled and void


def cityscapes_tree(root: Path) -> None:
    """leftImg8bit/val and gtFine/val at 2048x1024, labelIds in blocks (a sky band on top)."""
    rng = np.random.default_rng(0)
    for city, n in CITIES.items():
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            ids = rng.choice(CS_LABEL_IDS, size=(8, 16)).astype(np.uint8)
            ids[:2] = 23
            ids = ids.repeat(128, 0).repeat(128, 1)  # 1024 x 2048
            wide = ids.astype(np.int64)
            img = np.stack([wide * 9 % 256, wide * 5 % 256, wide * 3 % 256], -1)
            img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255)
            for folder, name, array in (
                ("leftImg8bit", "leftImg8bit", img.astype(np.uint8)),
                ("gtFine", "gtFine_labelIds", ids),
            ):
                path = root / folder / "val" / city / f"{stem}_{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path, compress_level=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """prepare -> encode -> (invert) -> extract -> a random head -> evaluate, as the stages do."""
    root = tmp_path_factory.mktemp("cs")
    cityscapes_tree(root / "cityscapes")
    model = store_model(root / "model")
    synthetic = str(root / "datasets" / "synthetic")
    data = {
        "source": {
            "kind": "synthetic",
            "domain": "game",
            "root": synthetic,
            "split": "train",
            "count": 4,
            "val_count": 2,
        },
        "targets": {
            "cityscapes": {
                "kind": "cityscapes",
                "root": str(root / "cityscapes"),
                "split": "val",
                "resolution": [64, 128],
            }
        },
        "synthetic": {"height": 32, "width": 64, "seed": 0},
    }
    write_params(
        root / "params.yaml",
        timesteps=[50],
        encode={"resolution": [32, 64]},
        evaluate={"save_predictions": True, "device": "cpu"},
        extract={"batch_size": 4, "shard_mb": shard_mb(4, model)},
    )
    params = load_params(root / "params.yaml")
    params["data"] = data
    data_cfg = read_group(params, "data", DataConfig)
    prepare.run(data_cfg, str(root / "datasets"), str(root / "manifests"), str(root / "freq.png"))
    model_cfg = read_group(params, "model", ModelConfig)
    encode.run(
        read_group(params, "encode", encode.EncodeConfig),
        read_group(params, "sampling", SamplingConfig),
        read_group(params, "prompts", PromptConfig),
        data_cfg,
        model_cfg,
        str(root / "manifests"),
        str(root / "datasets"),
        str(root / "model"),
        str(root / "encoded"),
        str(root / "encode.json"),
    )
    invert.run(
        read_group(params, "invert", invert.InvertConfig),
        "add",
        model_cfg,
        root / "encoded",
        root / "model",
        root / "trajectories",
        root / "invert.json",
    )
    extract.run(
        read_group(params, "extract", extract.ExtractConfig),
        model_cfg,
        50,
        str(root / "encoded"),
        str(root / "trajectories"),
        str(root / "model"),
        str(root / "features" / "t50"),
        str(root / "extract.json"),
    )
    specs = tap_specs([store_path(root / "features", 50, "game")])
    torch.manual_seed(0)
    head = SegModel(
        fusion_config(inputs={k: list(v) for k, v in specs.items()}, widths=[8] * 4),
        head_config(kind="mlp", embed_dim=8),
    )
    with torch.no_grad():  # a head that predicts several classes
        head.head.classifier.bias.copy_(torch.linspace(-1, 1, NUM_CLASSES))
    head.save_pretrained(root / "heads")
    cfg = read_group(params, "evaluate", EvalConfig)
    scores = evaluate.run(
        cfg,
        loader(),
        [50],
        str(root / "encoded"),
        str(root / "features"),
        str(root / "heads"),
        str(root / "metrics.json"),
        str(root / "scores.json"),
        str(root / "plots"),
        str(root / "predictions"),
    )
    return root, scores, head


def test_scores_at_2048x1024_equal_sklearn_on_upsampled_logits(run) -> None:
    root, scores, head = run

    rows = set_index(read_index(root / "encoded"), "cityscapes")
    assert set(zip(rows["height"], rows["width"], strict=True)) == {(1024, 2048)}
    assert set(zip(rows["content_h"], rows["content_w"], strict=True)) == {(64, 128)}
    ds = FeatureReader(
        [store_path(root / "features", 50, "cityscapes")],
        encoded_dir=root / "encoded",
        set_name="cityscapes",
    )
    truths, preds = [], []
    with torch.no_grad():
        for i in range(ds.n_rows):
            feats = {k: v[None].float() for k, v in ds.features(i).items()}
            logits = resize(resize(head.eval()(feats), (64, 128)), (1024, 2048))
            preds.append(logits.argmax(1)[0].numpy().ravel())
            label = np.asarray(Image.open(rows.iloc[i]["label"]))
            truths.append(label.ravel())
    truth, pred = np.concatenate(truths), np.concatenate(preds)
    keep = truth != IGNORE_INDEX
    matrix = confusion_matrix(truth[keep], pred[keep], labels=list(range(NUM_CLASSES)))
    tp, union = np.diag(matrix), matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    iou = {c: 100 * tp[k] / union[k] for k, c in enumerate(CLASSES) if union[k] > 0}
    got = scores["cityscapes"]
    assert got["mIoU"] == pytest.approx(np.mean(list(iou.values())), abs=1e-3)
    for name, value in got["IoU"].items():
        assert (value is None) == (name not in iou)
        if value is not None:
            assert value == pytest.approx(iou[name], abs=1e-3)
    assert got["aAcc"] == pytest.approx(100 * tp.sum() / matrix.sum(), abs=1e-3)
    # Scored at the label's size: every labeled pixel of the 2048x1024 labels counted once.
    assert matrix.sum() == keep.sum() and keep.sum() > 3 * 64 * 128


def test_cityscapesscripts_scores_the_exported_predictions_the_same(run) -> None:
    root, scores, _ = run
    preds = sorted((root / "predictions" / "cityscapes" / "labelIds").glob("*.png"))
    gts = sorted((root / "cityscapes" / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))
    assert len(preds) == len(gts) == sum(CITIES.values())
    assert len(list((root / "predictions" / "cityscapes" / "color").glob("*.png"))) == len(gts)
    exported = np.asarray(Image.open(preds[0]))
    assert exported.shape == (1024, 2048)
    assert set(np.unique(LABEL_ID_TO_TRAIN_ID[exported])) <= set(range(NUM_CLASSES))
    args = cs_eval.args
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    args.predictionPath = str(root / "predictions" / "cityscapes" / "labelIds")
    args.predictionWalk = None
    pred_files = [cs_eval.getPrediction(args, str(g)) for g in gts]
    result = cs_eval.evaluateImgLists(pred_files, [str(g) for g in gts], args)
    theirs = {k: 100 * v for k, v in result["classScores"].items() if not np.isnan(v)}
    ours = {k: v for k, v in scores["cityscapes"]["IoU"].items() if v is not None}
    assert theirs.keys() == ours.keys()
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-3), name
    assert scores["cityscapes"]["mIoU"] == pytest.approx(
        100 * result["averageScoreClasses"], abs=1e-3
    )
    assert json.loads((root / "metrics.json").read_text()) == scores


def test_a_canvas_off_the_model_grid_is_one_clear_error(tmp_path) -> None:
    """encode (and check_params, the same rule) names every size off the UNet's grid."""
    model = store_model(tmp_path / "m")  # two UNet levels: sides must be multiples of 16
    over = {"targets": {"fog": {"resolution": [40, 64]}}}
    data = read_group(helpers.params(data=over), "data", DataConfig)
    with pytest.raises(ConfigError, match=r"data.targets.fog.resolution \[40, 64\]: must be a "):
        encode.check_sizes(config("encode", encode.EncodeConfig), data, model.pixel_multiple)
    crops = config("encode", encode.EncodeConfig, crop=[40, 64])
    with pytest.raises(ConfigError, match=r"encode.crop \[40, 64\], .*: must be a multiple of 16"):
        encode.check_sizes(crops, data, model.pixel_multiple)
