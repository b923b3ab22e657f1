"""Prompt variants, DIFF's class prompts and the mask-guided cross-attention (tiny real models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import config, tiny_model

from pipeline.core.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES
from pipeline.core.errors import ConfigError
from pipeline.core.names import CATEGORY_PROMPT, GUIDED, GUIDED_PROMPT
from pipeline.diffusion.guided import guided_cross_attention, region_map
from pipeline.diffusion.model import DiffusionModel
from pipeline.diffusion.prompts import PromptConfig, class_prompts, variant_prompts
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.text import encode_text
from pipeline.diffusion.unet_features import guide_labels, prompt_contexts, unet_features
from pipeline.diffusion.unet_features import variant_features as variant_unet_features

ALL = ["scene", "plain", "night", "fog", "rain", "snow", "game", "guided", "category"]


@pytest.fixture(scope="module")
def model() -> DiffusionModel:
    model = tiny_model()
    model.unet.eval()
    model.text_encoder.eval()
    return model


def test_variants_and_class_prompts() -> None:
    cfg = config("prompts", PromptConfig, variants=ALL)
    texts = variant_prompts(cfg)
    assert list(texts) == cfg.variants
    assert texts["plain"] == ""
    assert texts["scene"] == "a photo of a city street"
    assert texts["night"] == "a photo of a city street at night"
    assert texts[GUIDED] == GUIDED_PROMPT
    prompts = class_prompts()
    assert len(prompts) == NUM_CLASSES
    assert prompts[13].startswith("A high quality photo; europe city; car, ")
    assert len(set(prompts)) == NUM_CLASSES
    with pytest.raises(ConfigError, match=r"prompts: unknown prompt variant 'dusk'"):
        config("prompts", PromptConfig, variants=["plain", "dusk"])
    with pytest.raises(ConfigError, match=r"prompts.variants: .*listed more than once"):
        config("prompts", PromptConfig, variants=["plain", "fog", "plain"])


def test_contexts_of_every_variant_kind(model: DiffusionModel) -> None:
    texts = variant_prompts(config("prompts", PromptConfig, variants=ALL))
    ctx = prompt_contexts(model, list(texts.values()))
    assert ctx.plain.shape == (1, 77, 16)
    assert ctx.category.shape == (1, NUM_CLASSES, 16)
    assert ctx.region.shape == (NUM_CLASSES, 77, 16) and ctx.diff == {}
    with torch.no_grad():
        scene, fog = encode_text(model, [texts["scene"], texts["fog"]])
    assert not torch.allclose(scene, fog)
    assert all(torch.isfinite(v).all() for v in (ctx.plain, ctx.category, ctx.region))
    bare = prompt_contexts(model, ["", "a street"])
    assert bare.region is None and bare.category is None and bare.diff == {}
    diff = prompt_contexts(
        model,
        [
            variant_prompts(config("prompts", PromptConfig, variants=["guided"], guided="diff"))[
                "guided"
            ]
        ],
    )
    assert sorted(diff.diff) == [1, 3, 12, 14, 16]  # DIFF's five class prompts


def test_scene_with_category_tokens(model: DiffusionModel) -> None:
    """Gong et al. as TADP describes them: the scene prompt and 19 averaged-EOS class tokens."""
    texts = variant_prompts(config("prompts", PromptConfig, variants=["scene+category"]))
    assert texts["scene+category"] == "a photo of a city street<+category>"
    ctx = prompt_contexts(model, list(texts.values()))
    taps = resolve_taps(model.unet, "diff", model.vae_stride)
    x = torch.randn(1, 4, 8, 16)
    with torch.no_grad():
        scene = encode_text(model, ["a photo of a city street"])
        both = variant_unet_features(model, x, 50, texts["scene+category"], scene, taps, None, ctx)
        alone = unet_features(model, x, 50, torch.cat([scene, ctx.category], 1), taps)
    for name in both:
        torch.testing.assert_close(both[name], alone[name])
    with pytest.raises(ConfigError, match="only a text variant takes"):
        config("prompts", PromptConfig, variants=["guided+category"])


def test_region_map_majority_and_ignore() -> None:
    labels = torch.full((1, 8, 8), IGNORE_INDEX, dtype=torch.uint8)
    labels[0, :, :4] = 2
    labels[0, :1, 4:] = 13  # minority of the right half: ignore wins there
    regions = region_map(labels, (2, 2), NUM_CLASSES)
    assert regions.tolist() == [[[2, NUM_CLASSES], [2, NUM_CLASSES]]]


def _unet_run(model, latents, context, hook_name: str):
    captured = {}
    module = dict(model.unet.named_modules())[hook_name]
    handle = module.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    try:
        with torch.no_grad():
            out = model.unet(latents, 50, encoder_hidden_states=context).sample
    finally:
        handle.remove()
    return out, captured["x"]


FIRST_ATTN2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def test_guided_attention_is_region_wise(model: DiffusionModel) -> None:
    contexts = prompt_contexts(model, [GUIDED_PROMPT])
    plain, classes = contexts.plain, contexts.region
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 8, 16)
    context = plain.expand(2, -1, -1)
    labels = torch.full((2, 64, 128), IGNORE_INDEX, dtype=torch.uint8)
    labels[:, :, :64] = CLASSES.index("road")
    labels[:, :, 64:] = CLASSES.index("car")
    _, plain_attn = _unet_run(model, latents, context, FIRST_ATTN2)
    with guided_cross_attention(model.unet, labels, classes):
        guided_out, guided_attn = _unet_run(model, latents, context, FIRST_ATTN2)
    road = torch.full_like(labels, CLASSES.index("road"))
    with guided_cross_attention(model.unet, road, classes):
        _, road_attn = _unet_run(model, latents, context, FIRST_ATTN2)
    # attn2 output (B, 16*16, C): left half of the grid is road, right half car.
    grid = guided_attn.view(2, 8, 16, -1)
    left, right = grid[:, :, :8], grid[:, :, 8:]
    road_grid = road_attn.view(2, 8, 16, -1)
    plain_grid = plain_attn.view(2, 8, 16, -1)
    # The first cross-attention sees identical inputs, so a road region matches an all-road run.
    torch.testing.assert_close(left, road_grid[:, :, :8], rtol=1e-5, atol=1e-6)
    assert (right - road_grid[:, :, 8:]).abs().max() > 1e-3
    assert (left - plain_grid[:, :, :8]).abs().max() > 1e-3
    assert (right - plain_grid[:, :, 8:]).abs().max() > 1e-3
    # Processors are restored after the block.
    assert all(
        type(p).__name__ != "GuidedCrossAttnProcessor" for p in model.unet.attn_processors.values()
    )
    assert torch.isfinite(guided_out).all()


def test_guided_equals_plain_when_every_prompt_is_plain(model: DiffusionModel) -> None:
    with torch.no_grad():
        plain = encode_text(model, [""])
    torch.manual_seed(2)
    latents = torch.randn(2, 4, 8, 16)
    context = plain.expand(2, -1, -1)
    labels = torch.randint(0, NUM_CLASSES, (2, 64, 128), dtype=torch.uint8)
    labels[:, :10] = IGNORE_INDEX
    reference, _ = _unet_run(model, latents, context, FIRST_ATTN2)
    with guided_cross_attention(model.unet, labels, plain.expand(NUM_CLASSES, -1, -1)):
        same, _ = _unet_run(model, latents, context, FIRST_ATTN2)
    torch.testing.assert_close(same, reference, rtol=1e-5, atol=1e-5)
    ignore = torch.full_like(labels, IGNORE_INDEX)
    other = torch.randn(NUM_CLASSES, 77, 16)
    with guided_cross_attention(model.unet, ignore, other):
        exact, _ = _unet_run(model, latents, context, FIRST_ATTN2)
    assert torch.equal(exact, reference)


def test_guided_variant_through_unet_features(model: DiffusionModel) -> None:
    taps = resolve_taps(model.unet, "diff", model.vae_stride)
    prompts = ["", "a photo of a city street", GUIDED_PROMPT, CATEGORY_PROMPT]
    contexts = prompt_contexts(model, prompts)
    assert contexts.region.shape == (NUM_CLASSES, 77, 16)
    torch.manual_seed(3)
    x_t = torch.randn(2, 4, 8, 16)
    labels = np.full((2, 64, 128), IGNORE_INDEX, dtype=np.uint8)
    labels[:, :32] = CLASSES.index("sky")
    labels[:, 32:] = CLASSES.index("road")
    # Row 1 is a target image: its guide is blanked, so it gets exactly the plain features.
    guide = guide_labels(labels, ["train", "val"])
    assert (guide[1] == IGNORE_INDEX).all() and (guide[0] == labels[0]).all()
    with torch.no_grad():
        plain_embeds = encode_text(model, [""])
        plain = unet_features(model, x_t, 50, plain_embeds, taps)
        guided = variant_unet_features(
            model, x_t, 50, GUIDED_PROMPT, plain_embeds, taps, torch.from_numpy(guide), contexts
        )
        category = variant_unet_features(
            model, x_t, 50, CATEGORY_PROMPT, plain_embeds, taps, None, contexts
        )
    assert set(guided) == set(plain) == {t.name for t in taps}
    for name in plain:
        assert torch.equal(guided[name][1], plain[name][1]), name
        assert (guided[name][0] - plain[name][0]).abs().max() > 1e-4, name
        assert not torch.allclose(category[name], plain[name]), name
    # Top (sky) and bottom (road) halves of the labeled image move differently from plain.
    fine = [t.name for t in taps if t.stride == 8][0]
    delta = (guided[fine][0] - plain[fine][0]).abs().mean(dim=0)
    h = delta.shape[0] // 2
    assert not torch.allclose(delta[:h].mean(), delta[h:].mean(), rtol=1e-2)
