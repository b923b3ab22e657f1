"""Prompts: scene-prompt variants (Gong et al.), DIFF's class prompts and mask-guided attention.

A *variant* is one conditioning of the UNet whose features the store caches (the V dimension of
each feature array). Text variants are plain strings; "guided" (DIFF) conditions each ground-truth
region on its class prompt; "category" (VPD) uses the 19 class-name embeddings as context.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES
from pipeline.errors import ModelError

GUIDED = "guided"
CATEGORY = "category"
PLAIN = "plain"
SCENE = "scene"
# Prompt texts that stand for non-text variants in encode.prompts and a store's identity:
# extract recognises them and conditions with class prompts / class-name embeddings instead.
GUIDED_PROMPT = "<guided>"
CATEGORY_PROMPT = "<category>"

# Short visual descriptions for DIFF's class prompts (one per Cityscapes train class, in order).
CLASS_DESCRIPTIONS: dict[str, str] = {
    "road": "flat asphalt surface where cars drive",
    "sidewalk": "paved path beside the road for pedestrians",
    "building": "facades of houses and offices with windows",
    "wall": "standalone wall of stone or concrete",
    "fence": "fence or railing made of metal or wood",
    "pole": "thin vertical pole for lamps or signs",
    "traffic light": "traffic signal with red, yellow and green lights",
    "traffic sign": "road sign board on a pole",
    "vegetation": "trees, bushes and hedges with green leaves",
    "terrain": "grass and soil on the ground",
    "sky": "open sky above the street",
    "person": "pedestrian walking or standing",
    "rider": "person riding a bicycle or motorcycle",
    "car": "passenger car on the road",
    "truck": "large truck for goods",
    "bus": "long public bus",
    "train": "tram or train on rails",
    "motorcycle": "motorbike with two wheels",
    "bicycle": "bicycle with two thin wheels",
}


@dataclasses.dataclass
class PromptConfig:
    """The `prompts` group of params.yaml."""

    scene: str = "a photo of a city street"
    # Condition words appended to the scene prompt: variant name -> words.
    conditions: dict[str, str] = dataclasses.field(
        default_factory=lambda: {
            "night": "at night",
            "fog": "in fog",
            "rain": "in rain",
            "snow": "in snow",
            "game": "in a video game",
        }
    )
    # Variant names in store order (V dimension): "plain" (empty prompt), "scene", a condition
    # name, "category" (VPD class-name context) or "guided" (DIFF, labeled source images only).
    variants: list[str] = dataclasses.field(
        default_factory=lambda: ["scene", "plain", "night", "fog", "rain", "snow", "game", "guided"]
    )
    # Not in params.yaml on purpose: a store's identity records only "<guided>"/"<category>",
    # so these texts are fixed by the code (its format version), never silently by a param.
    class_template: str = "A high quality photo; europe city; {name}, {description}"
    category_template: str = "a photo of a {name}"


def scene_prompt(cfg: PromptConfig, condition: str | None = None) -> str:
    """The scene prompt, with the words of `condition` appended when given."""
    if condition is None:
        return cfg.scene
    if condition not in cfg.conditions:
        raise ValueError(
            f"unknown prompt condition {condition!r} (known: {sorted(cfg.conditions)})"
        )
    return f"{cfg.scene} {cfg.conditions[condition]}"


def variant_prompts(cfg: PromptConfig) -> dict[str, str]:
    """Variant name -> prompt text in store order (these texts are `encode.prompts`).

    "guided" and "category" map to the placeholder texts GUIDED_PROMPT / CATEGORY_PROMPT.
    """
    out: dict[str, str] = {}
    for name in cfg.variants:
        if name in out:
            raise ValueError(f"prompt variant {name!r} listed twice in prompts.variants")
        if name == PLAIN:
            out[name] = ""
        elif name == SCENE:
            out[name] = scene_prompt(cfg)
        elif name == GUIDED:
            out[name] = GUIDED_PROMPT
        elif name == CATEGORY:
            out[name] = CATEGORY_PROMPT
        else:
            out[name] = scene_prompt(cfg, name)
    return out


def class_prompts(cfg: PromptConfig) -> list[str]:
    """DIFF's 19 class prompts, in train-id order."""
    return [
        cfg.class_template.format(name=name, description=CLASS_DESCRIPTIONS[name])
        for name in CLASSES
    ]


def encode_text(model: Any, prompts: list[str]) -> Tensor:
    """Last hidden states (P, L, D) of the model's text encoder, padded to the tokenizer length."""
    ids = tokenize(model.tokenizer, prompts).to(model.text_encoder.device)
    return model.text_encoder(input_ids=ids)[0]


def tokenize(tokenizer: Any, prompts: list[str]) -> Tensor:
    """Token ids (P, L), padded/truncated to the text encoder's context length, as SD does."""
    length = min(int(tokenizer.model_max_length), 77)
    enc = tokenizer(
        prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    return enc.input_ids


@torch.no_grad()
def category_context(model: Any, cfg: PromptConfig) -> Tensor:
    """VPD-style context (1, 19, D): each class name's end-of-text state, one token per class."""
    prompts = [cfg.category_template.format(name=name) for name in CLASSES]
    ids = tokenize(model.tokenizer, prompts).to(model.text_encoder.device)
    hidden = model.text_encoder(input_ids=ids)[0]
    eos = eos_positions(model.tokenizer, ids)
    return hidden[torch.arange(len(prompts)), eos][None]


def eos_positions(tokenizer: Any, ids: Tensor) -> Tensor:
    """Index of the first end-of-text token of each row of `ids` (P, L)."""
    eos_id = tokenizer.eos_token_id
    is_eos = ids == eos_id
    if not bool(is_eos.any(dim=1).all()):
        raise ModelError("tokenizer: a prompt has no end-of-text token (prompt too long?)")
    return is_eos.int().argmax(dim=1)


@torch.no_grad()
def variant_embeddings(model: Any, cfg: PromptConfig) -> dict[str, Tensor]:
    """Cross-attention context of every variant: name -> (1, L, D); "category" -> (1, 19, D);
    "guided" -> the 19 class prompts (19, L, D), used region-wise (with "plain" for the rest)."""
    texts = variant_prompts(cfg)
    contexts = special_contexts(model, list(texts.values()), cfg, text=True)
    return {name: contexts[text] for name, text in texts.items()}


@torch.no_grad()
def special_contexts(
    model: Any, prompts: list[str], cfg: PromptConfig | None = None, text: bool = False
) -> dict[str, Tensor]:
    """Contexts keyed by prompt text for the placeholders among `prompts` (all texts if `text`).

    GUIDED_PROMPT -> class prompts (19, L, D), and "" (plain, for unlabeled pixels) is included;
    CATEGORY_PROMPT -> (1, 19, D). Extract computes these once per run.
    """
    cfg = cfg or PromptConfig()
    out: dict[str, Tensor] = {}
    for prompt in prompts:
        if prompt == GUIDED_PROMPT:
            out[prompt] = encode_text(model, class_prompts(cfg))
            out.setdefault("", encode_text(model, [""]))
        elif prompt == CATEGORY_PROMPT:
            out[prompt] = category_context(model, cfg)
        elif text:
            out[prompt] = encode_text(model, [prompt])
    if text:
        return {prompt: out[prompt] for prompt in prompts}
    return out


def variant_unet_features(
    model: Any,
    latents_t: Tensor,
    t: int,
    prompt: str,
    prompt_embeds: Tensor,
    taps: list[Any],
    labels: Tensor | None,
    contexts: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Features of one stored variant: a text prompt, "<category>" or "<guided>".

    For "<guided>", `labels` (B, H, W) are the guide; rows without labels (target or val images:
    pass all-255 rows, or None for the whole batch) get exactly the plain-prompt features.
    `contexts` is special_contexts(model, prompts).
    """
    from pipeline.features import unet_features

    if prompt == GUIDED_PROMPT:
        plain = contexts[""]
        if labels is None:
            return unet_features(model, latents_t, t, plain, taps)
        return guided_unet_features(
            model, latents_t, t, labels, contexts[GUIDED_PROMPT], plain, taps
        )
    if prompt == CATEGORY_PROMPT:
        return unet_features(model, latents_t, t, contexts[CATEGORY_PROMPT], taps)
    return unet_features(model, latents_t, t, prompt_embeds, taps)


def guide_labels(labels: np.ndarray, splits: Sequence[str], split: str = "train") -> np.ndarray:
    """Labels (B, H, W) for the guided variant: rows of `split` kept, all other rows 255.

    Only the source domain has a train split, so target (and val) images get exactly the
    plain-prompt features in the guided slot: NaN-free, and never a label leak into evaluation.
    """
    keep = np.array([s == split for s in splits], dtype=bool)
    out = np.array(labels, copy=True)
    out[~keep] = IGNORE_INDEX
    return out


# --------------------------------------------------------------------------- DIFF's guided path


def region_map(labels: Tensor, size: tuple[int, int], num_regions: int) -> Tensor:
    """Majority-vote downsampling of an (B, H, W) label map to `size`; ignore -> `num_regions`."""
    labels = labels.long()
    idx = torch.where(
        (labels >= 0) & (labels < num_regions), labels, torch.full_like(labels, num_regions)
    )
    if tuple(idx.shape[-2:]) == tuple(size):
        return idx
    onehot = F.one_hot(idx, num_regions + 1).permute(0, 3, 1, 2).float()
    # Majority vote keeps thin classes better than picking one pixel per cell.
    votes = F.adaptive_avg_pool2d(onehot, size)
    return votes.argmax(dim=1)


def _grid_for(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) of a layer with `tokens` positions for an (height, width) label map."""
    for stride in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        h, w = math.ceil(height / stride), math.ceil(width / stride)
        if h * w == tokens:
            return h, w
    raise ModelError(
        f"guided attention: {tokens} query positions fit no stride of a {height}x{width} label map"
    )


class GuidedCrossAttnProcessor:
    """Cross-attention where each spatial position attends to the prompt of its label's region.

    Position with label c in [0, K) uses `region_embeds[c]` (K, L, D); ignore pixels (and any
    label >= K) use the layer's own `encoder_hidden_states` (the plain prompt). Mirrors
    diffusers' AttnProcessor2_0 otherwise, so with no labeled pixels it is that processor.
    """

    def __init__(self, labels: Tensor, region_embeds: Tensor) -> None:
        if labels.ndim != 3:
            raise ValueError(f"labels must be (B, H, W), got {tuple(labels.shape)}")
        if region_embeds.ndim != 3:
            raise ValueError(f"region_embeds must be (K, L, D), got {tuple(region_embeds.shape)}")
        self.labels = labels
        self.region_embeds = region_embeds
        self._regions: dict[tuple[int, int], Tensor] = {}

    def regions(self, tokens: int) -> Tensor:
        """Region index (B, tokens) for a layer with `tokens` positions (cached per grid)."""
        h, w = _grid_for(tokens, *self.labels.shape[-2:])
        if (h, w) not in self._regions:
            k = self.region_embeds.shape[0]
            self._regions[(h, w)] = region_map(self.labels, (h, w), k).flatten(1)
        return self._regions[(h, w)]

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        if encoder_hidden_states is None:
            raise ModelError("guided attention set on a self-attention layer (needs attn2)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        if attention_mask is not None:
            raise ModelError("guided attention does not support an encoder attention mask")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        head_dim = query.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)

        regions = self.regions(tokens).to(query.device)
        if regions.shape[0] != batch:
            raise ModelError(f"guided attention: {regions.shape[0]} label maps for batch {batch}")
        k = self.region_embeds.shape[0]
        out: Tensor | None = None
        for region in torch.unique(regions).tolist():
            if region == k:
                context = encoder_hidden_states
            else:
                context = self.region_embeds[region : region + 1].to(encoder_hidden_states)
                context = context.expand(batch, -1, -1)
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            key = attn.to_k(context).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            value = attn.to_v(context).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            part = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
            if out is None:
                out = part
            else:
                mask = (regions == region)[:, None, :, None]
                out = torch.where(mask, part, out)
        assert out is not None
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_modules(unet: torch.nn.Module) -> list[tuple[str, Any]]:
    """The UNet's cross-attention layers (diffusers names them `attn2`)."""
    found = [
        (name, module)
        for name, module in unet.named_modules()
        if name.endswith("attn2") and hasattr(module, "set_processor")
    ]
    if not found:
        raise ModelError("UNet has no cross-attention (attn2) layers: cannot condition on prompts")
    return found


@contextlib.contextmanager
def guided_cross_attention(
    unet: torch.nn.Module, labels: Tensor, region_embeds: Tensor
) -> Iterator[GuidedCrossAttnProcessor]:
    """Within the block, every attn2 layer of `unet` conditions region by region (restored after)."""
    processor = GuidedCrossAttnProcessor(labels, region_embeds)
    layers = cross_attention_modules(unet)
    saved = [(module, module.processor) for _, module in layers]
    try:
        for _, module in layers:
            module.set_processor(processor)
        yield processor
    finally:
        for module, old in saved:
            module.set_processor(old)


def guided_unet_features(
    model: Any,
    latents_t: Tensor,
    t: int,
    labels: Tensor,
    class_embeds: Tensor,
    plain_embeds: Tensor,
    taps: list[Any],
) -> dict[str, Tensor]:
    """Like `unet_features`, with each labeled region conditioned on its class prompt (DIFF).

    labels: (B, H, W) train ids at image resolution (255 -> the plain prompt); class_embeds:
    (19, L, D); plain_embeds: (1 or B, L, D).
    """
    from pipeline.features import unet_features  # the model helper's one-pass tap extractor

    if class_embeds.shape[0] != NUM_CLASSES:
        raise ValueError(f"class_embeds must hold {NUM_CLASSES} prompts, got {class_embeds.shape}")
    with guided_cross_attention(model.unet, labels, class_embeds):
        return unet_features(model, latents_t, t, plain_embeds, taps)
