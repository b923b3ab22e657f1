import numpy as np
import pytest
import torch
from _synthetic_features import CLASSES_USED, SPECS, SyntheticFeatures
from helpers import config, loader

from pipeline.core.errors import ConfigError, ModelError
from pipeline.heads.inference import evaluate_dataset
from pipeline.loops.train import (
    IterationSampler,
    TrainConfig,
    augment,
    class_pixel_counts,
    lr_factor,
    rcs_class_probs,
    train,
)


def small_cfg(**kw):
    base = dict(
        widths=[8, 16, 32, 64],
        embed_dim=16,
        hyper_channels=16,
        iterations=40,
        batch_size=4,
        lr=3e-3,
        head_lr_mult=3.0,
        warmup=5,
        log_interval=5,
        eval_interval=20,
        checkpoint_interval=10,
        crop=[32, 64],
    )
    base.update(kw)
    return config("train", TrainConfig, **base)


@pytest.fixture(scope="module")
def data():
    return SyntheticFeatures(24, seed=0), SyntheticFeatures(8, seed=1)


@pytest.mark.parametrize("fusion,head", [("stride", "daformer"), ("hyperfeatures", "mlp")])
def test_training_reduces_loss_and_beats_chance(tmp_path, data, fusion, head):
    train_set, val_set = data
    res = train(
        small_cfg(fusion=fusion, head=head),
        loader(),
        train_set,
        SPECS,
        tmp_path,
        val_set,
        progress=False,
    )
    losses = [r["loss"] for r in res.curve]
    assert losses[-1] < 0.5 * losses[0]
    assert [v["step"] for v in res.val] == [20, 40]
    chance = 100.0 / len(CLASSES_USED)
    s = evaluate_dataset(res.model, val_set, progress=False)[0].scores()
    assert s["mIoU"] > 1.5 * chance and s["aAcc"] > 80
    assert res.val[-1]["mIoU"] == pytest.approx(s["mIoU"])


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, data):
    train_set, _ = data
    cfg = small_cfg(iterations=12, checkpoint_interval=4, log_interval=3, dropout=0.3)
    full = train(cfg, loader(), train_set, SPECS, tmp_path / "a", progress=False)
    part = train(cfg, loader(), train_set, SPECS, tmp_path / "b", stop_after=7, progress=False)
    assert part.iterations_done == 7 and (tmp_path / "b" / "checkpoint" / "state.json").exists()
    resumed = train(cfg, loader(), train_set, SPECS, tmp_path / "b", progress=False)
    assert resumed.resumed_from == 7 and resumed.iterations_done == 12
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.curve == full.curve


def test_checkpoint_of_another_config_is_not_reused(tmp_path, data):
    train_set, _ = data
    train(
        small_cfg(iterations=8), loader(), train_set, SPECS, tmp_path, stop_after=4, progress=False
    )
    res = train(
        small_cfg(iterations=8, seed=1), loader(), train_set, SPECS, tmp_path, progress=False
    )
    assert res.resumed_from == 0


def test_poly_schedule_with_linear_warmup():
    cfg = config("train", TrainConfig, iterations=100, warmup=10, warmup_ratio=1e-6, poly_power=1.0)
    f = [lr_factor(cfg, i) for i in range(100)]
    assert f[0] == pytest.approx(1e-6)
    assert f[5] == pytest.approx(0.5 * 0.95, rel=1e-3)
    assert f[10] == pytest.approx(0.9) and f[99] == pytest.approx(0.01)
    assert all(a < b for a, b in zip(f[:9], f[1:10], strict=True))


def test_rare_class_sampling_favours_rare_classes():
    common, rare = torch.zeros(8, 8, dtype=torch.long), torch.zeros(8, 8, dtype=torch.long)
    rare[0, 0] = 5
    counts = class_pixel_counts([common] * 9 + [rare], 10)
    probs = rcs_class_probs(counts, temperature=0.01)
    assert probs[5] > 0.99 and probs[1] == 0
    cfg = config(
        "train", TrainConfig, rare_class_sampling=True, batch_size=10, crop=None, flip=False
    )
    sampler = IterationSampler(cfg, 10, (8, 8), 8, 0, 5, counts)
    rows = [r for batch in sampler for r, *_ in batch]
    assert np.mean(np.array(rows) == 9) > 0.9  # uniform sampling would give 0.1


def test_augment_crops_features_and_label_consistently():
    sample = SyntheticFeatures(1, seed=2)[0]
    out = augment(sample, [32, 64], 32, 64, flip=True)
    assert out["label"].shape == (32, 64)
    assert torch.equal(out["label"], sample["label"][32:64, 64:128].flip(-1))
    for k, (_, s) in SPECS.items():
        assert torch.equal(
            out["features"][k], sample["features"][k][:, 32 // s : 64 // s, 64 // s :].flip(-1)
        )


def test_crop_must_be_multiple_of_largest_stride(tmp_path, data):
    with pytest.raises(ModelError, match="multiple"):
        train(small_cfg(crop=[48, 64]), loader(), data[0], SPECS, tmp_path, progress=False)


def _label_rows(n: int, size=(64, 128)) -> list[np.ndarray]:
    rows = []
    for _ in range(n):
        lab = np.zeros(size, np.uint8)  # road
        lab[:, :64] = 10  # sky on the left half
        rows.append(lab)
    rows[3][40:56, 100:124] = 12  # a rider (class 12) in the bottom right of row 3
    return rows


def test_cat_max_ratio_retries_crops_dominated_by_one_class():
    """mmseg's RandomCrop(cat_max_ratio) as DIFF uses it (uda_gtaCAug config, 0.75): up to 10
    crops until no class covers 75 %; crops on the grid of the largest feature stride."""
    labels = _label_rows(4)
    cfg = config(
        "train",
        TrainConfig,
        crop=[32, 64],
        cat_max_ratio=0.75,
        flip=False,
        batch_size=16,
        rare_class_sampling=False,
    )
    sampler = IterationSampler(cfg, 4, (64, 128), 16, 0, 20, None, lambda r: labels[r])
    mixed = 0
    for batch in sampler:
        for row, y0, x0, _ in batch:
            assert y0 % 16 == 0 and x0 % 16 == 0 and y0 + 32 <= 64 and x0 + 64 <= 128
            crop = labels[row][y0 : y0 + 32, x0 : x0 + 64]
            _, cnt = np.unique(crop, return_counts=True)
            mixed += cnt.max() / cnt.sum() < 0.75
    # Of the five crop offsets across, one splits the classes under 75 %: 10 tries find it
    # 89 % of the time, one try 20 %.
    assert mixed > 0.8 * 20 * 16
    plain = config(
        "train", TrainConfig, crop=[32, 64], flip=False, batch_size=16, rare_class_sampling=False
    )
    unmixed = IterationSampler(plain, 4, (64, 128), 16, 0, 20, None, lambda r: labels[r])
    found = sum(
        np.unique(labels[r][y : y + 32, x : x + 64], return_counts=True)[1].max() / (32 * 64) < 0.75
        for b in unmixed
        for r, y, x, _ in b
    )
    assert found < 0.35 * 20 * 16


def test_rare_class_sampling_recrops_until_the_class_is_in_the_crop():
    """DIFF's rare-class sampling (uda_dataset.py:128-144): a class by rarity, an image with
    more than min_pixels of it, then up to 10 re-crops until the crop holds
    min_pixels x min_crop_ratio of it."""
    labels = _label_rows(6)
    counts = class_pixel_counts([torch.from_numpy(lab) for lab in labels], len(labels))
    cfg = config(
        "train",
        TrainConfig,
        crop=[32, 64],
        flip=False,
        batch_size=8,
        rare_class_sampling=True,
        rcs_min_pixels=200,
        rcs_min_crop_ratio=0.5,
    )
    sampler = IterationSampler(cfg, 6, (64, 128), 16, 0, 30, counts, lambda r: labels[r])
    riders = [(r, y, x) for b in sampler for r, y, x, _ in b if r == 3]
    assert len(riders) > 0.5 * 30 * 8  # the rare rider is drawn most often
    with_rider = [(labels[r][y : y + 32, x : x + 64] == 12).sum() > 100 for r, y, x in riders]
    assert np.mean(with_rider) > 0.9  # re-crops find it (a random crop: about 1 in 4)
    no_recrop = config(
        "train",
        TrainConfig,
        crop=[32, 64],
        flip=False,
        batch_size=8,
        rare_class_sampling=True,
        rcs_min_pixels=200,
    )
    once = IterationSampler(no_recrop, 6, (64, 128), 16, 0, 30, counts, lambda r: labels[r])
    hits = [
        (labels[r][y : y + 32, x : x + 64] == 12).sum() > 100
        for b in once
        for r, y, x, _ in b
        if r == 3
    ]
    assert np.mean(hits) < 0.6
    # Images with fewer than min_pixels of a class do not count for it.
    assert 3 in np.flatnonzero(counts[:, 12] > 200)
    few = config("train", TrainConfig, rare_class_sampling=True, rcs_min_pixels=700)
    assert IterationSampler(few, 6, (64, 128), 16, 0, 1, counts).class_probs[12] == 0
    none = config("train", TrainConfig, rare_class_sampling=True, rcs_min_pixels=10_000)
    with pytest.raises(ConfigError, match="train.rcs_min_pixels 10000: no training image"):
        IterationSampler(none, 6, (64, 128), 16, 0, 1, counts)
