"""Segmentation heads on fused multi-scale maps: DAFormer's (separable ASPP) and a light MLP head."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from pipeline.core.errors import ModelError
from pipeline.heads.blocks import conv_norm_act, kaiming_fan_out, resize

DAFORMER_DILATIONS = [1, 6, 12, 18]


@dataclasses.dataclass
class HeadConfig:
    """Head kind and sizes (DAFormer: embed_dim 256, dilations 1/6/12/18, dropout 0.1)."""

    kind: str  # a key of HEADS
    embed_dim: int
    dilations: list[int]
    dropout: float
    num_classes: int
    # GroupNorm by default: batches are a few crops, and BatchNorm's source-domain running
    # statistics shift under a domain gap; "bn" is DAFormer's (and DIFF's) original choice.
    norm: str


class SeparableASPP(nn.Module):
    """DAFormer's ASPP context fusion: 1x1 branch + depthwise-separable dilated 3x3 branches."""

    def __init__(self, in_ch: int, ch: int, dilations: list[int], norm: str) -> None:
        super().__init__()
        branches = []
        for d in dilations:
            if d == 1:
                branches.append(conv_norm_act(in_ch, ch, 1, norm))
            else:
                branches.append(
                    nn.Sequential(
                        conv_norm_act(in_ch, in_ch, 3, norm, padding=d, dilation=d, groups=in_ch),
                        conv_norm_act(in_ch, ch, 1, norm),
                    )
                )
        self.branches = nn.ModuleList(branches)
        self.bottleneck = conv_norm_act(len(dilations) * ch, ch, 3, norm, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([b(x) for b in self.branches], dim=1))


class EmbedFuseHead(nn.Module):
    """Per-input 1x1 embedding, resize to the finest map, concat, fuse, dropout, classifier."""

    def __init__(self, in_specs: list[tuple[int, int]], cfg: HeadConfig) -> None:
        super().__init__()
        # Built in this order (embeddings, fuse, classifier): parameter initialisation order
        # is part of what makes a seeded training run reproducible.
        # The embeddings are DAFormer's MLP (nn.Linear) as 1x1 convolutions: the same default
        # init (kaiming-uniform, a = sqrt(5), over fan-in).
        self.embed = nn.ModuleList(nn.Conv2d(c, cfg.embed_dim, 1) for c, _ in in_specs)
        self.fuse = self.make_fuse(len(in_specs) * cfg.embed_dim, cfg)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(cfg.embed_dim, cfg.num_classes, 1)
        kaiming_fan_out(self.fuse)  # mmcv ConvModule's own init (DAFormer's fusion layers)
        # BaseDecodeHead's init_cfg: conv_seg ~ N(0, 0.01), bias 0 (decode_head.py:70-71).
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def make_fuse(self, in_ch: int, cfg: HeadConfig) -> nn.Module:
        raise NotImplementedError

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        x = torch.cat([resize(e(m), size) for e, m in zip(self.embed, maps, strict=True)], dim=1)
        return self.classifier(self.dropout(self.fuse(x)))


class DAFormerHead(EmbedFuseHead):
    """DAFormer's head: the embeddings fused by a depthwise-separable ASPP."""

    def make_fuse(self, in_ch: int, cfg: HeadConfig) -> nn.Module:
        return SeparableASPP(in_ch, cfg.embed_dim, cfg.dilations, cfg.norm)


class MLPHead(EmbedFuseHead):
    """SegFormer-like light head: the embeddings fused by one 1x1 conv."""

    def make_fuse(self, in_ch: int, cfg: HeadConfig) -> nn.Module:
        return conv_norm_act(in_ch, cfg.embed_dim, 1, cfg.norm)


# Every segmentation head, by `train.head` (HeadConfig.kind): the one place a head is declared.
HEADS: dict[str, type[EmbedFuseHead]] = {"daformer": DAFormerHead, "mlp": MLPHead}
HeadKind = Literal[tuple(HEADS)]


def build_head(in_specs: list[tuple[int, int]], cfg: HeadConfig) -> nn.Module:
    """The head of cfg.kind on maps of (channels, stride), fine to coarse."""
    if cfg.kind not in HEADS:
        raise ModelError(f"unknown head kind {cfg.kind!r} (one of {list(HEADS)})")
    return HEADS[cfg.kind](in_specs, cfg)
