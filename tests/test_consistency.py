"""Prompt randomization, consistency and DIFF's guided-path loss over a real multi-variant store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import config, extract, make_encoded, shard_mb, store_model

from pipeline.cache.encoded import read_prompts
from pipeline.cache.preload import MemoryReader
from pipeline.cache.reader import FeatureReader, tap_specs
from pipeline.cache.variants import Views, prompt_indices
from pipeline.core.classes import NUM_CLASSES
from pipeline.core.errors import StoreError
from pipeline.core.names import GUIDED_PROMPT
from pipeline.data.samples import Pick, ViewsDataset, collate
from pipeline.diffusion.prompts import PromptConfig, variant_prompts
from pipeline.heads.losses import ViewLoss, consistency_loss, views_loss
from pipeline.loops.extract import ExtractConfig
from pipeline.loops.train import TrainConfig, build_model


def test_views_pick_prompts_and_pairs() -> None:
    rng = np.random.default_rng(0)
    views = Views((1, 3, 4), draws=1, pairing="random")
    picks = [views.pick(rng, 0) for _ in range(600)]
    assert {p[0] for p in picks} == {1, 3, 4}
    assert all(p[1] != p[0] for p in picks)
    assert {p[1] for p in picks} == {1, 3, 4}
    anchor = Views((1, 3, 4), draws=1, pairing="anchor")
    assert all(anchor.pick(rng, 0)[1] == 1 for _ in range(20))
    with pytest.raises(StoreError, match="pairing"):
        Views((1, 3), draws=1, pairing="nearest")
    with pytest.raises(StoreError, match="at least two"):
        Views((1,), draws=1, pairing="random")


def test_consistency_losses() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(2, NUM_CLASSES, 4, 8), torch.randn(2, NUM_CLASSES, 4, 8)
    for kind in ("kl", "mse"):
        assert consistency_loss(a, a, kind) == 0
        assert consistency_loss(a, b, kind) > 0
        torch.testing.assert_close(consistency_loss(a, b, kind), consistency_loss(b, a, kind))
    # Adding a constant to all logits leaves the softmax (and the KL) unchanged, not the MSE.
    assert consistency_loss(a, a + 3.0, "kl") < 1e-6
    assert consistency_loss(a, a + 3.0, "mse") > 1.0
    valid = torch.zeros(2, 4, 8, dtype=torch.bool)
    assert consistency_loss(a, b, "kl", valid) == 0


def test_guided_path_loss_trains_both_paths() -> None:
    """DIFF's path-controlled loss: CE(plain) + CE(guided) + w * MSE(plain, guided), both trained."""
    torch.manual_seed(0)
    logits = torch.randn(2, 2, NUM_CLASSES, 4, 8, requires_grad=True)  # (B, [plain, guided], ...)
    label = torch.randint(0, NUM_CLASSES, (2, 16, 32))
    label[:, :2] = 255
    cfg = ViewLoss(
        consistency_weight=0.0, consistency="kl", guided_weight=1.0, guided_consistency_weight=0.5
    )
    total, parts = views_loss(lambda f: f["logits"], {"logits": logits}, label, cfg)
    # Each view its own forward (DIFF's two batch-1 passes): the MSE pairs view 0 and view 1.
    torch.testing.assert_close(
        torch.tensor(parts["guided_mse"]), ((logits[:, 0] - logits[:, 1]) ** 2).mean().detach()
    )
    expected = parts["ce"] + parts["ce_guided"] + 0.5 * parts["guided_mse"]
    assert abs(float(total.detach()) - expected) < 1e-4
    total.backward()
    assert logits.grad[:, 0].abs().sum() > 0 and logits.grad[:, 1].abs().sum() > 0


def test_views_over_a_real_store(tmp_path: Path) -> None:
    prompts_cfg = config("prompts", PromptConfig, variants=["plain", "scene", "fog", "guided"])
    texts = variant_prompts(prompts_cfg)
    model = store_model(tmp_path / "model")
    enc = tmp_path / "enc"
    make_encoded(enc, model, 6, tuple(texts.values()), names=tuple(texts))
    prompts = read_prompts(enc)
    store = tmp_path / "t50"
    mb = shard_mb(2, model, variants=len(texts))
    cfg = config("extract", ExtractConfig, taps="diff", batch_size=2, shard_mb=mb)
    extract(model, enc, 50, store, cfg)
    train_variants = prompt_indices(["scene", "fog"], prompts.names)
    assert train_variants == [1, 2]
    guided = prompt_indices(["guided"], prompts.names)[0]
    assert prompts.texts[guided] == GUIDED_PROMPT
    with pytest.raises(StoreError, match="not in the feature store"):
        prompt_indices(["night"], prompts.names)

    reader = FeatureReader([store], encoded_dir=enc, set_name="game")
    views = Views(tuple(train_variants), reader.draws, "random", guided)
    data = ViewsDataset(reader, None)
    rng = np.random.default_rng(0)
    sample = data[Pick(0, 0, views.pick(rng, 0))]
    feats = sample.features
    assert all(v.shape[0] == 3 for v in feats.values())
    key = next(iter(feats))
    # The three views are different variants of the same image.
    assert not torch.equal(feats[key][0], feats[key][1])
    assert not torch.equal(feats[key][0], feats[key][2])
    train_cfg = config(
        "train",
        TrainConfig,
        head="mlp",
        widths=[8] * 4,
        embed_dim=8,
        consistency_weight=1.0,
        guided_weight=1.0,
    )
    head = build_model(train_cfg, tap_specs([store]))
    batch = collate([data[Pick(r, 0, views.pick(rng, 0))] for r in (0, 1)])
    feats32 = {k: v.float() for k, v in batch.features.items()}  # as the trainer casts
    loss, parts = views_loss(head, feats32, batch.label, train_cfg.view_loss())
    assert set(parts) == {"ce", "ce_pair", "consistency", "ce_guided", "guided_mse"}
    assert parts["consistency"] > 0 and parts["guided_mse"] > 0
    loss.backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)
    # Preloaded (what train does), every variant the views can read is held with exactly the
    # values the store holds for it.
    mem = MemoryReader(reader, [0, 1, 2, 3], views.variants_of(0), progress=False)
    for v in views.variants_of(0):
        assert torch.equal(mem.features(1, v)[key], reader.features(1, v)[key])
    assert torch.equal(mem.label(1), reader.label(1))


def test_views_of_several_draws_read_their_draw(tmp_path: Path) -> None:
    """K = 2 draws: variant v is prompt v // 2, draw v % 2; every view of a sample (the random
    prompt, its pair, the guided view) reads the sample's draw, as DIFF's two views share one
    augmented image; the draws themselves differ."""
    prompts_cfg = config("prompts", PromptConfig, variants=["plain", "scene", "fog", "guided"])
    texts = variant_prompts(prompts_cfg)
    model = store_model(tmp_path / "model")
    enc = tmp_path / "enc"
    make_encoded(enc, model, 6, tuple(texts.values()), names=tuple(texts), draws=2)
    store = tmp_path / "t50"
    mb = shard_mb(2, model, variants=2 * len(texts))
    cfg = config("extract", ExtractConfig, taps="diff", batch_size=2, shard_mb=mb)
    extract(model, enc, 50, store, cfg)
    reader = FeatureReader([store], encoded_dir=enc, set_name="game")
    assert reader.draws == 2 and reader.n_variants == 8
    views = Views((1, 2), 2, "random", 3)
    data = ViewsDataset(reader, None)
    rng = np.random.default_rng(0)
    key = next(iter(reader.features(0)))
    for draw in (0, 1, 1, 0):
        variants = views.pick(rng, draw)
        assert [v % 2 for v in variants] == [draw] * 3 and variants[2] == 3 * 2 + draw
        sample = data[Pick(2, draw, variants)]
        for i, v in enumerate(variants):
            assert torch.equal(sample.features[key][i], reader.features(2, v)[key])
    assert not torch.equal(reader.features(2, 2)[key], reader.features(2, 3)[key])
