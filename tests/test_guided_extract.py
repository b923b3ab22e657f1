"""Guided variants through the real extraction loop: source train rows guided by their labels,
every other row's guided slot blind to its label; the guided view with its own noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import (
    RESOLUTION,
    config,
    encoded_prompts,
    extract,
    make_encoded,
    shard_mb,
    store_model,
)

from pipeline.cache.encoded import LABELS_NAME, open_latents, read_index, set_index
from pipeline.cache.storage import parse_storage
from pipeline.cache.store import FeatureStore
from pipeline.core.names import GUIDED_DIFF_PROMPT, GUIDED_PROMPT
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.unet_features import prompt_contexts, variant_features
from pipeline.extraction.extractor import Extractor
from pipeline.extraction.noise import noise_mode
from pipeline.extraction.recipe import FeatureRecipe, noised
from pipeline.loops.extract import ExtractConfig


def _relabel(enc: Path, domain: str) -> None:
    """Every label road: DIFF's guided passes see no class of theirs (which classes are present,
    not where, sets its attention passes), the region variant other regions."""
    labels = zarr.open_array(enc / domain / LABELS_NAME, mode="r+")
    labels[:] = np.zeros(labels.shape, np.uint8)


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
        shard_mb=shard_mb(2, model, variants=2),
        conditioning=conditioning,
    )
    for domain in ("game", "real"):
        extract(model, enc, 50, tmp_path / domain, cfg, domain)
    # DIFF's guided view has its own noise (and posterior sample): every guided feature of a
    # source training row differs from its plain one.
    store = FeatureStore.open(tmp_path / "game")
    assert store.identity.prompts == ("", placeholder)
    for tap in store.taps:
        for i in range(store.n_images):
            plain, guided = store.read(tap, i, 0), store.read(tap, i, 1)
            assert np.isfinite(guided).all() and not np.array_equal(plain, guided), (tap, i)
    # The source's rows are guided by their labels; the target's guided slot never sees its
    # labels (no label leak into evaluation): other labels, the same features.
    for domain, guided_rows in (("game", True), ("real", False)):
        before = FeatureStore.open(tmp_path / domain)
        values = {t: [before.read(t, i, 1) for i in range(before.n_images)] for t in before.taps}
        _relabel(enc, domain)
        extract(model, enc, 50, tmp_path / f"{domain}2", cfg, domain)
        after = FeatureStore.open(tmp_path / f"{domain}2")
        same = all(
            np.array_equal(values[t][i], after.read(t, i, 1))
            for t in before.taps
            for i in range(before.n_images)
        )
        assert same != guided_rows, domain
    # The guided slot of an unlabeled row is the plain prompt's features at the guided view's
    # own x_t (noise stream "guided").
    real = FeatureStore.open(tmp_path / "real2")
    x0 = torch.from_numpy(np.asarray(open_latents(enc, "real")[:2, 0]))
    shas = list(set_index(read_index(enc), "real")["sha256"])
    taps = resolve_taps(model.unet, "diff", model.vae_stride)
    recipe = FeatureRecipe(taps, 50, 0, noise_mode("add"), conditioning, parse_storage("fp16"))
    x_t = noised(model, recipe, x0, shas, 0, "guided")
    contexts = prompt_contexts(model, ["", placeholder])
    with torch.no_grad():
        want = variant_features(
            model, x_t, 50, placeholder, None, taps, None, contexts, conditioning
        )
    for tap in real.taps:
        got = torch.from_numpy(real.read(tap, 0, 1).astype(np.float32))
        torch.testing.assert_close(got, want[tap][0].half().float())


def test_guided_prompts_follow_each_crop_draws_own_label(tmp_path: Path) -> None:
    """DIFF picks the guided path's class prompts from the crop's ground truth
    (diffusion.py:162-269 runs on the cropped gt_semantic_seg): with crop draws, the guided view
    of draw k is guided by draw k's label, whatever the other draws hold."""
    model = store_model(tmp_path / "model")
    taps = resolve_taps(model.unet, "diff", model.vae_stride)
    recipe = FeatureRecipe(taps, 50, 0, noise_mode("add"), "diff", parse_storage("fp16"))
    extractor = Extractor(
        model, recipe, encoded_prompts(model, ["plain", "guided"], ["", GUIDED_DIFF_PROMPT])
    )
    h, w = RESOLUTION
    torch.manual_seed(0)
    x_t = {k: torch.randn(1, 2, 4, h // 8, w // 8) for k in ("plain", "guided")}
    guide = torch.zeros(1, 2, h, w, dtype=torch.long)  # both draws road only
    guide[0, 1, :, : w // 2] = 1  # draw 1 holds a sidewalk: one of DIFF's five prompts
    values = extractor.batch(x_t, guide)["values"]
    relabeled = guide.clone()
    relabeled[0, 0, : h // 2] = 12  # draw 0 now holds a rider
    again = extractor.batch(x_t, relabeled)["values"]
    # Variants are prompt x draw: 0, 1 plain (draws 0, 1); 2, 3 guided (draws 0, 1).
    # DIFF's ResNet features come from the first ("") pass; the prompts reach the attention.
    for tap in values:
        assert np.array_equal(values[tap][:, :2], again[tap][:, :2]), tap  # plain: no labels
        assert np.array_equal(values[tap][:, 3], again[tap][:, 3]), tap  # draw 1 untouched
        if "attn" in tap:  # draw 0 re-guided
            assert not np.array_equal(values[tap][:, 2], again[tap][:, 2]), tap
    # Draw 1's guided view is the one its own label gives, as a frame alone would.
    single = extractor.raw_features({k: v[:, 1:] for k, v in x_t.items()}, 1, guide[:, 1])
    for tap in values:
        want = single[tap].to(torch.float16).numpy()
        assert np.array_equal(values[tap][:, 3], want), tap
