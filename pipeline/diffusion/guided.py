"""DIFF's guided conditioning: each ground-truth region's positions attend to its class prompt."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core.errors import ModelError


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
