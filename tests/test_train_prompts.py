"""Head training with prompt randomization + consistency + DIFF's guided path, from a real store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from store_helpers import make_encoded, tiny_model

from pipeline.consistency import VariantViews, resolve_variants
from pipeline.encoded import open_labels, open_latents, read_prompts
from pipeline.extract import ExtractConfig, extract_store
from pipeline.prompts import PromptConfig, variant_prompts
from pipeline.reader import FeatureDataset, tap_specs
from pipeline.train import TrainConfig, prompt_loss_config, train


def test_train_with_prompt_views(tmp_path: Path) -> None:
    texts = variant_prompts(PromptConfig(variants=["scene", "plain", "fog", "guided"]))
    model = tiny_model(tmp_path / "model")
    index = make_encoded(tmp_path / "enc", model, 6, tuple(texts.values()))
    enc = tmp_path / "enc"
    prompts, embeds, _ = read_prompts(enc / "prompts.safetensors")
    cfg_x = ExtractConfig(taps="diff", batch_size=2, images_per_shard=2)
    store = tmp_path / "t50"
    extract_store(
        model, open_latents(enc), index, prompts, embeds, 50, store, cfg_x,
        progress=False, labels=open_labels(enc),
    )  # fmt: skip
    cfg = TrainConfig(
        iterations=4, batch_size=2, widths=[8, 8, 8, 8], embed_dim=8, crop=None,
        train_variants=["scene", "plain", "fog"], consistency_weight=1.0, guided_weight=1.0,
        eval_interval=0, checkpoint_interval=100, log_interval=1, device="cpu",
    )  # fmt: skip
    rows = [i for i, s in enumerate(index["split"]) if s == "train"]
    base = FeatureDataset([store], rows, encoded_dir=enc)
    lc = prompt_loss_config(cfg)
    views = VariantViews(
        base,
        resolve_variants(cfg.train_variants, texts, prompts),
        lc,
        resolve_variants(["guided"], texts, prompts)[0],
    )
    result = train(cfg, views, tap_specs([store]), tmp_path / "work", progress=False)
    assert result.iterations_done == 4
    assert all(np.isfinite(c["loss"]) for c in result.curve)
    # The stage's wrapper picks the same views from params.
    import runpy

    stage = runpy.run_path(str(Path(__file__).parents[1] / "stages" / "train.py"))
    params = {"prompts": {"variants": ["scene", "plain", "fog", "guided"]}}
    wrapped = stage["prompt_views"](base, cfg, params, str(store))
    assert isinstance(wrapped, VariantViews)
    assert wrapped.variants == [0, 1, 2] and wrapped.guided == 3
    assert stage["prompt_views"](base, TrainConfig(), params, str(store)) is base
