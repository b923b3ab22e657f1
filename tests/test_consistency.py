"""Prompt randomization, consistency and DIFF's guided-path loss over a real multi-variant store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import config, extract, make_encoded, store_model

from pipeline.cache.encoded import read_prompts
from pipeline.cache.preload import preload
from pipeline.cache.reader import FeatureDataset, tap_specs
from pipeline.cache.variants import VariantViews, draw_variants, pair_variants, resolve_variants
from pipeline.core.classes import NUM_CLASSES
from pipeline.core.errors import StoreError
from pipeline.core.names import GUIDED_PROMPT
from pipeline.diffusion.prompts import PromptConfig, variant_prompts
from pipeline.heads.losses import ViewLoss, consistency_loss, views_loss
from pipeline.loops.extract import ExtractConfig
from pipeline.loops.train import TrainConfig, build_model


def test_draw_and_pair_variants() -> None:
    gen = torch.Generator().manual_seed(0)
    pool = [1, 3, 4]
    first = draw_variants(600, pool, gen)
    assert set(first.tolist()) == set(pool)
    second = pair_variants(first, pool, "random", gen)
    assert (second != first).all()
    assert set(second.tolist()) == set(pool)
    assert (pair_variants(first, pool, "anchor") == 1).all()
    with pytest.raises(ValueError, match="pairing"):
        pair_variants(first, pool, "nearest")


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
    cfg = config("extract", ExtractConfig, taps="diff", batch_size=2, images_per_shard=2)
    extract(model, enc, 50, store, cfg)
    train_variants = resolve_variants(["scene", "fog"], prompts.names)
    assert train_variants == [1, 2]
    guided = resolve_variants(["guided"], prompts.names)[0]
    assert prompts.texts[guided] == GUIDED_PROMPT
    with pytest.raises(StoreError, match="not in the feature store"):
        resolve_variants(["night"], prompts.names)

    base = FeatureDataset([store], [0, 1, 2, 3], encoded_dir=enc, domain="game")
    views = VariantViews(base, train_variants, "random", guided)
    torch.manual_seed(0)
    sample = views[0]
    feats = sample["features"]
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
    batch = torch.utils.data.default_collate([views[0], views[1]])
    feats32 = {k: v.float() for k, v in batch["features"].items()}  # as the trainer casts
    loss, parts = views_loss(head, feats32, batch["label"], train_cfg.view_loss())
    assert set(parts) == {"ce", "ce_pair", "consistency", "ce_guided", "guided_mse"}
    assert parts["consistency"] > 0 and parts["guided_mse"] > 0
    loss.backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)
    # Preloaded (what train does), the views still draw a fresh pair at every access, with
    # exactly the values the store holds for that variant.
    mem = preload(views, progress=False)
    assert isinstance(mem, VariantViews) and mem is not views
    pairs = set()
    for _ in range(12):
        drawn = mem[1]["features"][key]
        firsts = [v for v in train_variants if torch.equal(drawn[0], _variant(base, 1, v, key))]
        assert len(firsts) == 1 and torch.equal(drawn[2], _variant(base, 1, guided, key))
        pairs.add(firsts[0])
    assert pairs == set(train_variants)


def _variant(base, item: int, variant: int, key: str) -> torch.Tensor:
    base.variant = variant
    return base[item]["features"][key]
