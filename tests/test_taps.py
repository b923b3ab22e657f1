"""Tap presets on the real SD-2.1 UNet config (meta device) and on the small model."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import tiny_model

from pipeline.core.errors import ModelError
from pipeline.diffusion.build import sd21_unet as build_sd21_unet
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.unet_features import unet_features


@pytest.fixture(scope="module")
def sd21_unet() -> UNet2DConditionModel:
    return build_sd21_unet("meta")  # SD-2.1's public config, kept in the package (no weights)


def test_diff_preset_on_sd21(sd21_unet: UNet2DConditionModel) -> None:
    taps = resolve_taps(sd21_unet, "diff")
    assert len(taps) == 21
    res = [t for t in taps if not t.tokens]
    attn = [t for t in taps if t.tokens]
    assert [t.name for t in res] == [f"up{i}_res{j}" for i in range(4) for j in range(3)]
    assert [t.module_path for t in res][:2] == [
        "up_blocks.0.resnets.0.conv2",
        "up_blocks.0.resnets.1.conv2",
    ]
    assert [t.channels for t in res] == [1280] * 6 + [640] * 3 + [320] * 3
    assert [t.stride for t in res] == [64] * 3 + [32] * 3 + [16] * 3 + [8] * 3
    assert [t.name for t in attn] == [f"up{i}_attn{j}" for i in (1, 2, 3) for j in range(3)]
    assert attn[0].module_path == "up_blocks.1.attentions.0.transformer_blocks.0"
    assert [t.channels for t in attn] == [1280] * 3 + [640] * 3 + [320] * 3
    assert [t.stride for t in attn] == [32] * 3 + [16] * 3 + [8] * 3


def test_other_presets_on_sd21(sd21_unet: UNet2DConditionModel) -> None:
    hyper = resolve_taps(sd21_unet, "hyperfeatures")
    assert len(hyper) == 12 and not any(t.tokens for t in hyper)
    vpd = resolve_taps(sd21_unet, "vpd")
    assert [(t.module_path, t.channels) for t in vpd] == [
        ("up_blocks.0", 1280),
        ("up_blocks.1", 1280),
        ("up_blocks.2", 640),
        ("up_blocks.3", 320),
    ]
    # up blocks 0-2 end with an upsampler: their outputs are at twice the resolution of their ResNets.
    assert [t.stride for t in vpd] == [32, 16, 8, 8]
    assert [(t.module_path, t.stride) for t in resolve_taps(sd21_unet, "dift")] == [
        ("up_blocks.1", 16)
    ]


def test_bad_specs(sd21_unet: UNet2DConditionModel) -> None:
    with pytest.raises(
        ModelError, match=r"not in the UNet; valid paths: .*up_blocks\.1\.resnets\.0"
    ):
        resolve_taps(sd21_unet, ["up_blocks.1.resnets.0", "up_blocks.9.resnets.0"])
    with pytest.raises(ModelError, match="unknown tap preset 'difff'"):
        resolve_taps(sd21_unet, "difff")
    explicit = resolve_taps(sd21_unet, ["mid_block", "up_blocks.2.attentions.1"])
    assert [(t.name, t.stride, t.channels) for t in explicit] == [
        ("mid_block", 64, 1280),
        ("up_blocks.2.attentions.1", 16, 640),
    ]


def test_features_match_taps_on_small_model() -> None:
    model = tiny_model()
    taps = resolve_taps(model.unet, "diff", vae_stride=model.vae_stride)
    assert len(taps) == 21
    latents = torch.randn(2, 4, 8, 16)  # a 64x128 image
    context = torch.randn(1, 77, 16)
    with torch.no_grad():
        feats = unet_features(model, latents, 50, context, taps)
        full = unet_features(model, latents, 50, context, taps, stop_early=False)
    for tap in taps:
        assert feats[tap.name].shape == (2, tap.channels, 64 // tap.stride, 128 // tap.stride)
        torch.testing.assert_close(feats[tap.name], full[tap.name])
    # The ResNet tap is the residual branch: the block's output adds the skip to it.
    resnet = model.unet.up_blocks[3].resnets[0]
    seen = {}
    hook = resnet.register_forward_hook(lambda m, a, out: seen.update(inp=a[0], out=out))
    with torch.no_grad():
        unet_features(model, latents, 50, context, taps)
    hook.remove()
    skip = resnet.conv_shortcut(seen["inp"])
    torch.testing.assert_close(seen["out"], (skip + feats["up3_res0"]) / resnet.output_scale_factor)
