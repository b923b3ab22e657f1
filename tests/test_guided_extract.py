"""Guided variants through the real extraction loop: source train rows guided, others plain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import config, extract, make_encoded, store_model

from pipeline.cache.store import FeatureStore
from pipeline.core.names import GUIDED_DIFF_PROMPT, GUIDED_PROMPT
from pipeline.loops.extract import ExtractConfig


@pytest.mark.parametrize(
    "placeholder,conditioning",
    [(GUIDED_PROMPT, "single"), (GUIDED_DIFF_PROMPT, "diff"), (GUIDED_DIFF_PROMPT, "single")],
)
def test_guided_variant_in_store(tmp_path: Path, placeholder: str, conditioning: str) -> None:
    model = store_model(tmp_path / "model")
    enc = tmp_path / "enc"
    make_encoded(enc, model, 6, ("", placeholder), names=("plain", "guided"))
    cfg = config(
        "extract",
        ExtractConfig,
        taps="diff",
        batch_size=2,
        images_per_shard=2,
        conditioning=conditioning,
    )
    for domain, guided_rows in (("game", True), ("real", False)):
        extract(model, enc, 50, tmp_path / domain, cfg, domain)
        store = FeatureStore.open(tmp_path / domain)
        assert store.identity.prompts == ("", placeholder)
        for tap in store.taps:
            for i in range(store.n_images):
                plain, guided = store.read(tap, i, 0), store.read(tap, i, 1)
                assert np.isfinite(guided).all()
                # DIFF's guided passes change only attention features, and only where one of
                # its five classes (sidewalk, wall, rider, truck, train) is in the label.
                changes = guided_rows and (placeholder == GUIDED_PROMPT or "attn" in tap)
                if changes:
                    assert not np.array_equal(plain, guided), (domain, tap, i)
                elif placeholder == GUIDED_PROMPT or conditioning == "diff":
                    assert np.array_equal(plain, guided), (domain, tap, i)
