"""Head training with prompt randomization + consistency + DIFF's guided path, from a real store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import config, extract, loader, make_encoded, sampling, shard_mb, store_model

from pipeline.diffusion.prompts import PromptConfig, variant_prompts
from pipeline.loops.extract import ExtractConfig
from pipeline.loops.train import TrainConfig, source_data, train


def test_train_with_prompt_views(tmp_path: Path) -> None:
    prompts_cfg = config("prompts", PromptConfig, variants=["scene", "plain", "fog", "guided"])
    texts = variant_prompts(prompts_cfg)
    model = store_model(tmp_path / "model")
    enc = tmp_path / "enc"
    make_encoded(enc, model, 6, tuple(texts.values()), names=tuple(texts))
    mb = shard_mb(2, model, variants=len(texts))
    cfg_x = config("extract", ExtractConfig, taps="diff", batch_size=2, shard_mb=mb)
    extract(model, enc, 50, tmp_path / "t50" / "game", cfg_x)
    cfg = config(
        "train",
        TrainConfig,
        iterations=4,
        batch_size=2,
        widths=[8, 8, 8, 8],
        embed_dim=8,
        train_variants=["scene", "plain", "fog"],
        consistency_weight=1.0,
        guided_weight=1.0,
        eval_interval=0,
        checkpoint_interval=100,
        log_interval=1,
        device="cpu",
    )
    # The train stage's readers: the named variants, a consistency pair, the guided view.
    data = source_data(cfg, enc, tmp_path, [50])
    views = data.views
    assert views.prompts == (0, 1, 2) and views.guided == 3 and views.pairing == "random"
    assert views.count == 3
    result = train(cfg, sampling(), loader(), data, tmp_path / "work", progress=False)
    assert result.iterations_done == 4
    assert all(np.isfinite(c["loss"]) for c in result.curve)
    plain = source_data(config("train", TrainConfig), enc, tmp_path, [50]).views
    assert plain.count == 1 and plain.prompts == (0,)
