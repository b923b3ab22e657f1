"""The synthetic benchmark: determinism, shared layouts, class coverage and domain appearance."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.classes import NUM_CLASSES
from pipeline.data.synthetic import DOMAINS, ROAD, SKY, SceneGenerator, sample_grid


@pytest.fixture(scope="module")
def gen() -> SceneGenerator:
    return SceneGenerator(64, 128, seed=3)


def test_same_seed_gives_byte_identical_scenes_in_any_order(gen):
    other = SceneGenerator(64, 128, seed=3)
    for domain in DOMAINS:
        image, label = gen.sample(7, domain, "val")
        for i in range(3):  # generating other scenes first must not change scene 7
            other.sample(i, domain, "val")
        image2, label2 = other.sample(7, domain, "val")
        assert image.tobytes() == image2.tobytes(), domain
        assert label.tobytes() == label2.tobytes(), domain
        assert image.shape == (64, 128, 3) and image.dtype == np.uint8
        assert label.shape == (64, 128) and label.dtype == np.uint8


def test_seed_split_and_index_change_the_scene(gen):
    base = gen.sample(0, "game", "train")[1]
    assert not np.array_equal(base, gen.sample(1, "game", "train")[1])
    assert not np.array_equal(base, gen.sample(0, "game", "val")[1])
    assert not np.array_equal(base, SceneGenerator(64, 128, seed=4).sample(0, "game", "train")[1])


def test_domains_share_the_layout_but_not_the_appearance(gen):
    labels, images = [], []
    for domain in DOMAINS:
        image, label = gen.sample(5, domain, "val")
        images.append(image.astype(np.int16))
        labels.append(label)
    for label in labels[1:]:
        np.testing.assert_array_equal(label, labels[0])
    for i in range(len(DOMAINS)):
        for j in range(i + 1, len(DOMAINS)):
            assert np.abs(images[i] - images[j]).mean() > 3, (DOMAINS[i], DOMAINS[j])


def test_all_19_classes_appear_with_plausible_frequencies():
    gen = SceneGenerator(128, 256, seed=0)
    counts = np.zeros(256, dtype=np.int64)
    for i in range(60):
        counts += np.bincount(gen.layout(i, "train").label.ravel(), minlength=256)
    assert counts[NUM_CLASSES:].sum() == 0  # every pixel has a class
    share = counts[:NUM_CLASSES] / counts.sum()
    missing = [c for c in range(NUM_CLASSES) if share[c] == 0]
    assert not missing, missing
    order = np.argsort(-share)
    assert ROAD in order[:3] and SKY in order[:6]
    assert share[12] < 0.01 and share[16] < 0.02  # rider and train are rare


def test_fog_haze_grows_with_depth_and_night_is_dark(gen):
    layout = gen.layout(2, "val")
    real = gen.render(layout, "real", 2, "val").astype(np.float32)
    fog = gen.render(layout, "fog", 2, "val").astype(np.float32)
    night = gen.render(layout, "night", 2, "val").astype(np.float32)
    change = np.abs(fog - real).mean(axis=-1)
    ground = layout.depth < 1e3
    near = ground & (layout.depth < np.percentile(layout.depth[ground], 25))
    far = ground & (layout.depth > np.percentile(layout.depth[ground], 75))
    assert change[far].mean() > change[near].mean() + 5
    assert night.mean() < 0.5 * real.mean()


def test_game_is_sharper_than_the_camera_look(gen):
    game = gen.sample(4, "game", "val")[0].astype(np.float32)
    real = gen.sample(4, "real", "val")[0].astype(np.float32)
    assert np.abs(np.diff(game, axis=1)).max() > np.abs(np.diff(real, axis=1)).max()
    # game colors are more saturated
    assert (game.max(-1) - game.min(-1)).mean() > (real.max(-1) - real.min(-1)).mean()


def test_bad_arguments_raise(gen):
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        gen.sample(0, "underwater")
    with pytest.raises(ValueError, match="unknown split"):
        gen.sample(0, "game", "holdout")
    with pytest.raises(ValueError, match="too small"):
        SceneGenerator(8, 8)


def test_grid_shows_every_domain_with_its_label(gen):
    grid = sample_grid(gen, 1)
    assert grid.shape == (64 * len(DOMAINS), 256, 3)
