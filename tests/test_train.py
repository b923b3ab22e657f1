import numpy as np
import pytest
import torch
from _synthetic_features import CLASSES_USED, SPECS, SyntheticFeatures, train_data
from helpers import config, loader, sampling

from pipeline.cache.variants import Views
from pipeline.core.errors import ConfigError
from pipeline.data.samples import Pick, ViewsDataset
from pipeline.data.sampling import RareClassSampling, RcsTable, SamplingConfig, pixel_counts
from pipeline.heads.inference import evaluate_dataset
from pipeline.loops.train import IterationSampler, TrainConfig, TrainData, lr_factor, train


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
    )
    base.update(kw)
    return config("train", TrainConfig, **base)


def crops(**kw):
    """The sampling the small runs train with: feature-space crops of 32x64."""
    return sampling(**{"feature_crop": [32, 64], **kw})


@pytest.fixture(scope="module")
def data():
    return SyntheticFeatures(24, seed=0), SyntheticFeatures(8, seed=1)


@pytest.mark.parametrize("fusion,head", [("stride", "daformer"), ("hyperfeatures", "mlp")])
def test_training_reduces_loss_and_beats_chance(tmp_path, data, fusion, head):
    train_set, val_set = data
    res = train(
        small_cfg(fusion=fusion, head=head),
        crops(),
        loader(),
        train_data(train_set, val_set),
        tmp_path,
        progress=False,
    )
    losses = [r["loss"] for r in res.curve]
    assert losses[-1] < 0.5 * losses[0]
    assert [v["step"] for v in res.val] == [20, 40]
    chance = 100.0 / len(CLASSES_USED)
    s = evaluate_dataset(res.model, val_set, progress=False)[0].scores()
    assert s["mIoU"] > 1.5 * chance and s["aAcc"] > 80
    assert res.val[-1]["mIoU"] == pytest.approx(s["mIoU"])


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, data, capsys):
    train_set, _ = data
    cfg = small_cfg(iterations=12, checkpoint_interval=4, log_interval=3, dropout=0.3)
    full = train(cfg, crops(), loader(), train_data(train_set), tmp_path / "a", progress=False)
    part = train(
        cfg, crops(), loader(), train_data(train_set), tmp_path / "b", stop_after=7, progress=False
    )
    assert part.iterations_done == 7 and (tmp_path / "b" / "checkpoint" / "state.json").exists()
    resumed = train(cfg, crops(), loader(), train_data(train_set), tmp_path / "b", progress=False)
    assert resumed.resumed_from == 7 and resumed.iterations_done == 12
    assert "resuming from iteration 7" in capsys.readouterr().out
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.curve == full.curve


def test_checkpoint_of_another_config_is_not_reused_and_says_so(tmp_path, data, capsys):
    train_set, _ = data
    d = train_data(train_set)
    train(small_cfg(iterations=8), crops(), loader(), d, tmp_path, stop_after=4, progress=False)
    res = train(small_cfg(iterations=8, seed=1), crops(), loader(), d, tmp_path, progress=False)
    assert res.resumed_from == 0
    out = capsys.readouterr().out
    assert "checkpoint of other settings (train.seed differ); starting over" in out


def test_poly_schedule_with_linear_warmup():
    cfg = config("train", TrainConfig, iterations=100, warmup=10, warmup_ratio=1e-6, poly_power=1.0)
    f = [lr_factor(cfg, i) for i in range(100)]
    assert f[0] == pytest.approx(1e-6)
    assert f[5] == pytest.approx(0.5 * 0.95, rel=1e-3)
    assert f[10] == pytest.approx(0.9) and f[99] == pytest.approx(0.01)
    assert all(a < b for a, b in zip(f[:9], f[1:10], strict=True))


class Labels:
    """A reader of labels only (what the sampler reads)."""

    draws = 1

    def __init__(self, labels: list[np.ndarray]) -> None:
        self.labels, self.n_rows = labels, len(labels)

    def label(self, row: int, draw: int = 0) -> torch.Tensor:
        return torch.from_numpy(self.labels[row])

    def features(self, row: int, variant: int = 0) -> dict:
        return {}

    def views(self, row: int, variants: list[int]) -> dict:
        return {}


def _data(labels, draw_pixels=None, draws=1) -> TrainData:
    reader = Labels(labels)
    reader.draws = draws
    counts = np.stack([pixel_counts(x) for x in labels])
    rows = list(range(len(labels)))
    return TrainData(reader, rows, {}, Views((0,), draws), counts, draw_pixels, "")


def _sampler(data: TrainData, max_stride: int, stop: int, batch_size: int = 8, **sampling):
    """Iterations 0..stop of the default's train and sampling groups, the sampling keys changed."""
    cfg = config("train", TrainConfig, batch_size=batch_size)
    return IterationSampler(
        cfg, config("sampling", SamplingConfig, **sampling), data, max_stride, 0, stop
    )


def test_rare_class_sampling_favours_rare_classes():
    common, rare = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    rare[0, 0] = 5
    d = _data([common] * 9 + [rare])
    table = RcsTable(d.class_pixels, RareClassSampling(0.01, 0, 0.0))
    assert table.class_probs[5] > 0.99 and table.class_probs[1] == 0
    sampler = _sampler(d, 8, 5, batch_size=10, rare_class_sampling=True, flip=False)
    rows = [p.row for batch in sampler for p in batch]
    assert np.mean(np.array(rows) == 9) > 0.9  # uniform sampling would give 0.1


def get_rcs_class_probs(sample_class_stats: list[dict], temperature: float):
    """DAFormer's get_rcs_class_probs as DIFF ships it (mmseg/datasets/uda_dataset.py:20-39),
    reading the stats from a list instead of sample_class_stats.json."""
    overall_class_stats = {}
    for s in sample_class_stats:
        s = dict(s)
        s.pop("file")
        for c, n in s.items():
            c = int(c)
            if c not in overall_class_stats:
                overall_class_stats[c] = n
            else:
                overall_class_stats[c] += n
    overall_class_stats = {
        k: v for k, v in sorted(overall_class_stats.items(), key=lambda item: item[1])
    }
    freq = torch.tensor(list(overall_class_stats.values()))
    freq = freq / torch.sum(freq)
    freq = 1 - freq
    freq = torch.softmax(freq / temperature, dim=-1)
    return list(overall_class_stats.keys()), freq.numpy()


def test_class_probabilities_are_daformers():
    """From every pixel of every image (not only images above min_pixels), as DAFormer."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5000, size=(30, 19)) * (rng.random((30, 19)) < 0.4)
    stats = [
        {"file": f"f{i}", **{str(c): int(n) for c, n in enumerate(row) if n > 0}}
        for i, row in enumerate(counts)
    ]
    classes, probs = get_rcs_class_probs(stats, 0.05)
    table = RcsTable(counts, RareClassSampling(0.05, 0, 0.0))
    np.testing.assert_allclose(table.class_probs[classes], probs, rtol=1e-5)
    assert table.class_probs.sum() == pytest.approx(1.0)
    # With min_pixels, images count for a class only above it (uda_dataset.py:76-79), and the
    # probabilities stay DAFormer's over every pixel.
    strict = RcsTable(counts, RareClassSampling(0.05, 3000, 0.5))
    np.testing.assert_allclose(strict.class_probs[classes], probs, rtol=1e-5)
    for c in classes:
        assert set(strict.images_with[c]) == set(np.flatnonzero(counts[:, c] > 3000))


def test_views_dataset_crops_features_and_label_consistently():
    reader = SyntheticFeatures(1, seed=2)
    out = ViewsDataset(reader, [32, 64])[Pick(0, 0, (0, 0), 32, 64, True)]
    sample = reader[0]
    assert out.label.shape == (32, 64)
    assert torch.equal(out.label, sample.label[32:64, 64:128].flip(-1))
    for k, (_, s) in SPECS.items():
        want = sample.features[k][:, 32 // s : 64 // s, 64 // s :].flip(-1)
        assert out.features[k].shape[0] == 2  # two views stacked
        assert torch.equal(out.features[k][1], want)


def test_crop_must_be_multiple_of_largest_stride(tmp_path, data):
    with pytest.raises(ConfigError, match="multiple"):
        cfg, crop = small_cfg(), crops(feature_crop=[48, 64])
        train(cfg, crop, loader(), train_data(data[0]), tmp_path, progress=False)


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
    sampler = _sampler(
        _data(labels),
        16,
        20,
        batch_size=16,
        feature_crop=[32, 64],
        cat_max_ratio=0.75,
        flip=False,
        rare_class_sampling=False,
    )
    mixed = 0
    for batch in sampler:
        for p in batch:
            assert p.y0 % 16 == 0 and p.x0 % 16 == 0 and p.y0 + 32 <= 64 and p.x0 + 64 <= 128
            crop = labels[p.row][p.y0 : p.y0 + 32, p.x0 : p.x0 + 64]
            _, cnt = np.unique(crop, return_counts=True)
            mixed += cnt.max() / cnt.sum() < 0.75
    # Of the five crop offsets across, one splits the classes under 75 %: 11 tries find it
    # 91 % of the time, one try 20 %.
    assert mixed > 0.8 * 20 * 16
    plain = _sampler(
        _data(labels),
        16,
        20,
        batch_size=16,
        feature_crop=[32, 64],
        flip=False,
        rare_class_sampling=False,
    )
    found = sum(
        np.unique(labels[p.row][p.y0 : p.y0 + 32, p.x0 : p.x0 + 64], return_counts=True)[1].max()
        / (32 * 64)
        < 0.75
        for b in plain
        for p in b
    )
    assert found < 0.35 * 20 * 16


def test_rare_class_sampling_recrops_until_the_class_is_in_the_crop():
    """DIFF's rare-class sampling (uda_dataset.py:128-144): a class by rarity, an image with
    more than min_pixels of it, then up to 10 re-crops until the crop holds
    min_pixels x min_crop_ratio of it."""
    labels = _label_rows(6)
    d = _data(labels)
    sampler = _sampler(
        d,
        16,
        30,
        feature_crop=[32, 64],
        flip=False,
        rare_class_sampling=True,
        rcs_min_pixels=200,
        rcs_min_crop_ratio=0.5,
    )
    riders = [(p.row, p.y0, p.x0) for b in sampler for p in b]
    riders = [r for r in riders if r[0] == 3]
    assert len(riders) > 0.5 * 30 * 8  # the rare rider is drawn most often
    with_rider = [(labels[r][y : y + 32, x : x + 64] == 12).sum() > 100 for r, y, x in riders]
    assert np.mean(with_rider) > 0.9  # re-crops find it (a random crop: about 1 in 4)
    no_recrop = _sampler(
        d, 16, 30, feature_crop=[32, 64], flip=False, rare_class_sampling=True, rcs_min_pixels=200
    )
    hits = [
        (labels[p.row][p.y0 : p.y0 + 32, p.x0 : p.x0 + 64] == 12).sum() > 100
        for b in no_recrop
        for p in b
        if p.row == 3
    ]
    assert np.mean(hits) < 0.6
    # Images with fewer than min_pixels of a class do not count for it.
    assert 3 in np.flatnonzero(d.class_pixels[:, 12] > 200)
    few = _sampler(d, 16, 1, rare_class_sampling=True, rcs_min_pixels=700)
    assert few.table.class_probs[12] == 0
    with pytest.raises(ConfigError, match="sampling.rcs_min_pixels 10000: no training image"):
        _sampler(d, 16, 1, rare_class_sampling=True, rcs_min_pixels=10_000)


def test_crop_draws_are_read_whole_and_chosen_as_the_recrops_would():
    """With crop draws, a sample of a rare class reads one of the image's draws holding enough
    of it (what DAFormer's re-crops end on); no feature-space crop or flip."""
    labels = [np.zeros((16, 16), np.uint8) for _ in range(4)]
    labels[2][:8, :8] = 12  # the frame statistics: image 2 holds the rare rider
    draw_pixels = np.zeros((4, 3, 19), np.int64)
    draw_pixels[:, :, 0] = 256
    draw_pixels[2, 1, 12] = 64  # only draw 1 of image 2 caught the rider
    sampler = _sampler(
        _data(labels, draw_pixels, 3),
        8,
        20,
        rare_class_sampling=True,
        rcs_min_pixels=40,
        rcs_min_crop_ratio=0.5,
    )
    picks = [p for b in sampler for p in b]
    riders = [p for p in picks if p.row == 2]
    assert len(riders) > 0.8 * len(picks)
    assert {p.draw for p in riders} == {1}
    assert all(p.y0 == p.x0 == 0 and not p.flip for p in picks)
    others = [p.draw for p in picks if p.row != 2]
    assert set(others) <= {0, 1, 2}


def test_views_share_the_samples_draw():
    """DIFF's plain and guided views read the same augmented image (encoder_decoder.py:281-282):
    every view of a sample is a variant of its one draw, whichever draw it is."""
    views = Views((0, 1), draws=4, pairing="random", guided=2)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        d = int(rng.integers(4))
        variants = views.pick(rng, d)
        assert [v % 4 for v in variants] == [d, d, d]
        assert variants[-1] == 2 * 4 + d and variants[0] != variants[1]
        seen.add(d)
    assert seen == {0, 1, 2, 3}


def test_gradients_are_clipped_at_max_norm_as_diff(tmp_path, data):
    """DIFF clips every step at max_norm 5 (mmseg/models/uda/dacs.py:171, train_step, on the
    source-only path too): a clip far above the gradients' norm changes nothing, one below it
    changes the run (Adam's moments see the clipped gradients)."""
    train_set, _ = data
    base = dict(iterations=4, checkpoint_interval=4)

    def weights(clip, name):
        cfg = small_cfg(**base, grad_clip=clip)
        return train(
            cfg, sampling(), loader(), train_data(train_set), tmp_path / name, progress=False
        ).model

    free, huge, tight = weights(None, "free"), weights(1e9, "huge"), weights(1e-3, "tight")
    a, b, c = free.state_dict(), huge.state_dict(), tight.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].dtype.is_floating_point)
    assert config("train", TrainConfig).grad_clip == 5.0  # the default is DIFF's
