"""Guided (DIFF) variant through the real extraction loop: train rows guided, others plain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import config, make_encoded, store_model

from pipeline.cache.encoded import open_labels, open_latents, read_prompts
from pipeline.cache.store import FeatureStore
from pipeline.core.names import GUIDED_PROMPT
from pipeline.loops.extract import ExtractConfig, extract_store


def test_guided_variant_in_store(tmp_path: Path) -> None:
    model = store_model(tmp_path / "model")
    index = make_encoded(tmp_path / "enc", model, 6, ("", GUIDED_PROMPT), names=("plain", "guided"))
    enc = tmp_path / "enc"
    cfg = config("extract", ExtractConfig, taps="diff", batch_size=2, images_per_shard=2)
    extract_store(
        model, open_latents(enc), index, read_prompts(enc), 50, tmp_path / "t50", cfg, "fp32",
        progress=False, labels=open_labels(enc),
    )  # fmt: skip
    store = FeatureStore.open(tmp_path / "t50")
    assert store.identity.prompts == ("", GUIDED_PROMPT)
    for tap in store.taps:
        for i, split in enumerate(index["split"]):
            plain, guided = store.read(tap, i, 0), store.read(tap, i, 1)
            assert np.isfinite(guided).all()
            if split == "train":
                assert not np.array_equal(plain, guided), (tap, i)
            else:
                assert np.array_equal(plain, guided), (tap, i)
