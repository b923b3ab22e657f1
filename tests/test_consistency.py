"""Prompt randomization, consistency and DIFF's guided-path loss over a real multi-variant store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.classes import NUM_CLASSES
from pipeline.consistency import (
    PromptLossConfig,
    VariantViews,
    consistency_loss,
    draw_variants,
    guided_path_loss,
    pair_variants,
    resolve_variants,
    views_loss,
)
from pipeline.errors import StoreError
from pipeline.prompts import GUIDED_PROMPT, PromptConfig, variant_prompts


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
    torch.manual_seed(0)
    plain = torch.randn(2, NUM_CLASSES, 4, 8, requires_grad=True)
    guided = torch.randn(2, NUM_CLASSES, 4, 8, requires_grad=True)
    label = torch.randint(0, NUM_CLASSES, (2, 16, 32))
    label[:, :2] = 255
    total, parts = guided_path_loss(plain, guided, label, consistency_weight=0.5)
    expected = parts["ce_plain"] + parts["ce_guided"] + 0.5 * parts["guided_mse"]
    assert abs(float(total.detach()) - expected) < 1e-4
    total.backward()
    assert plain.grad.abs().sum() > 0 and guided.grad.abs().sum() > 0


def test_views_over_a_real_store(tmp_path: Path) -> None:
    from store_helpers import make_encoded, tiny_model

    from pipeline.encoded import open_labels, open_latents
    from pipeline.extract import ExtractConfig, extract_store
    from pipeline.fusion import FusionConfig
    from pipeline.heads import HeadConfig, SegModel
    from pipeline.reader import FeatureDataset, tap_specs

    cfg_prompts = PromptConfig(variants=["plain", "scene", "fog", "guided"])
    texts = variant_prompts(cfg_prompts)
    model = tiny_model(tmp_path / "model")
    index = make_encoded(tmp_path / "enc", model, 4, tuple(texts.values()))
    from pipeline.encoded import read_prompts

    prompts, embeds, _ = read_prompts(tmp_path / "enc" / "prompts.safetensors")
    store = tmp_path / "t50"
    cfg = ExtractConfig(taps="diff", batch_size=2, images_per_shard=2)
    extract_store(
        model,
        open_latents(tmp_path / "enc"),
        index,
        prompts,
        embeds,
        50,
        store,
        cfg,
        progress=False,
        labels=open_labels(tmp_path / "enc"),
    )
    train_variants = resolve_variants(["scene", "fog"], texts, prompts)
    assert train_variants == [1, 2]
    guided = resolve_variants(["guided"], texts, prompts)[0]
    assert prompts[guided] == GUIDED_PROMPT
    with pytest.raises(StoreError, match="not in the feature store"):
        resolve_variants(["night"], variant_prompts(PromptConfig()), prompts)

    loss_cfg = PromptLossConfig(consistency_weight=1.0, guided_weight=1.0)
    base = FeatureDataset([store], [0, 1, 2, 3], encoded_dir=tmp_path / "enc")
    views = VariantViews(base, train_variants, loss_cfg, guided)
    torch.manual_seed(0)
    sample = views[0]
    feats = sample["features"]
    assert all(v.shape[0] == 3 for v in feats.values())
    key = next(iter(feats))
    # The three views are different variants of the same image.
    assert not torch.equal(feats[key][0], feats[key][1])
    assert not torch.equal(feats[key][0], feats[key][2])
    specs = tap_specs([store])
    head = SegModel(
        FusionConfig(kind="stride", inputs={k: list(v) for k, v in specs.items()}, widths=[8] * 4),
        HeadConfig(kind="mlp", embed_dim=8),
    )
    batch = torch.utils.data.default_collate([views[0], views[1]])
    feats32 = {k: v.float() for k, v in batch["features"].items()}  # as the trainer casts
    loss, parts = views_loss(head, feats32, batch["label"], loss_cfg)
    assert set(parts) == {"ce", "ce_pair", "consistency", "ce_guided", "guided_mse"}
    assert parts["consistency"] > 0 and parts["guided_mse"] > 0
    loss.backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)
    # Preloaded (what train does), the views still draw a fresh pair at every access, with
    # exactly the values the store holds for that variant.
    from pipeline.preload import preload

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
