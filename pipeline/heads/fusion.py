"""Fusion of cached multi-layer, multi-timestep diffusion features into multi-scale maps.

Two recipes (docs/architecture.md, "Method facts"): DIFF's per-stride direct aggregation with
the top-down "finecoder", and the Diffusion Hyperfeatures aggregation (one bottleneck per layer
shared over timesteps, softmax mixing weights per (layer, timestep)). Inputs are the reader's
feature dict, keys str(FeatureKey) ("t50/up1_res0"), each (B, C, h, w) at a known stride.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from pipeline.core.errors import ModelError
from pipeline.core.names import FeatureKey
from pipeline.heads.blocks import Bottleneck, ResBlock, group_norm, kaiming_fan_out, resize


@dataclasses.dataclass
class FusionConfig:
    """Which fusion, its inputs and widths (saved in a SegModel's config.json)."""

    kind: str  # a key of FUSIONS, or "pixels" (heads/pixel_cnn.py: the from-scratch baseline)
    inputs: dict[str, list[int]]  # {str(FeatureKey): [channels, stride]} from the store's taps
    # stride: finecoder widths at out_strides (DIFF: 256/512/1024/2048 at 4/8/16/32).
    out_strides: list[int]
    widths: list[int]
    channels: int  # hyperfeatures: the one map's width (the paper: 384)


def _by_tap_then_time(key: str) -> tuple[str, int]:
    k = FeatureKey.parse(key)
    return k.tap, k.timestep


def _diff_order(keys: list[str]) -> list[str]:
    """DIFF's channel order within a stride: its taps in the order the preset declares them
    (the store's, and so the inputs': `diff_paths` lists each block's ResNets, then its
    attentions), each over timesteps from the noisiest (collect_stride_feats_with_timesteplist,
    diffusion.py:364-398)."""
    rank: dict[str, int] = {}
    for key in keys:
        rank.setdefault(FeatureKey.parse(key).tap, len(rank))
    return sorted(
        keys, key=lambda k: (rank[FeatureKey.parse(k).tap], -FeatureKey.parse(k).timestep)
    )


class DiffFinecoder(nn.Module):
    """DIFF's fusion: per stride, concat(layers x timesteps) -> one bottleneck (GroupNorm 16,
    aggregation_network.py:226-307); the finecoder (finecoder.py:110-190) GroupNorms the
    1/8, 1/16, 1/32 outputs (32 groups), discards 1/64, and builds 1/4 top-down
    (ConvTranspose k4 s2 p1 + ResBlock, adding 1/16 and 1/8 on the way). The head gets
    [x4, x8, x16, x32]: the fused 1/4 map and the normalized bottleneck outputs. Kaiming
    fan-out init throughout, as DIFF's weights_init.
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        width = dict(zip(cfg.out_strides, cfg.widths, strict=True))
        if sorted(width) != [4, 8, 16, 32]:
            raise ModelError(
                f"DIFF's finecoder needs out_strides [4, 8, 16, 32], got {cfg.out_strides}"
            )
        self.cfg = cfg
        by_stride: dict[int, list[str]] = {}
        for key in _diff_order(list(cfg.inputs)):
            stride = int(cfg.inputs[key][1])
            if stride in (8, 16, 32):
                by_stride.setdefault(stride, []).append(key)
        if sorted(by_stride) != [8, 16, 32]:
            raise ModelError(
                f"DIFF's finecoder needs features at strides 8, 16 and 32, got {sorted(by_stride)}"
            )
        self.keys_by_stride = by_stride
        self.bottleneck = nn.ModuleDict(
            {
                str(s): Bottleneck(
                    sum(int(cfg.inputs[k][0]) for k in keys), width[s], width[s] // 4, groups=16
                )
                for s, keys in sorted(by_stride.items())
            }
        )
        self.norm = nn.ModuleDict({str(s): group_norm(width[s]) for s in (8, 16, 32)})
        self.up = nn.ModuleDict(
            {
                str(fine): nn.ConvTranspose2d(width[2 * fine], width[fine], 4, 2, 1)
                for fine in (16, 8, 4)
            }
        )
        self.refine = nn.ModuleDict({str(s): ResBlock(width[s]) for s in (16, 8, 4)})
        self.out_specs = [(width[s], s) for s in (4, 8, 16, 32)]
        kaiming_fan_out(self)

    def forward(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        x = {
            s: self.norm[str(s)](self.bottleneck[str(s)](torch.cat([features[k] for k in keys], 1)))
            for s, keys in self.keys_by_stride.items()
        }
        y = x[32]
        for fine in (16, 8, 4):
            y = self.up[str(fine)](y)
            if fine in x:
                y = resize(y, x[fine].shape[-2:]) + x[fine]
            y = self.refine[str(fine)](y)
        return [y, x[8], x[16], x[32]]


class StrideAggregation(nn.Module):
    """Ours: per stride concat(layers x timesteps) -> bottleneck, then top-down through every
    stride from the coarsest (transposed conv k2 s2, add, bottleneck), all strides kept."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        if not cfg.inputs:
            raise ModelError("StrideAggregation needs at least one input feature spec")
        if len(cfg.widths) != len(cfg.out_strides):
            raise ModelError(
                f"widths {cfg.widths} and out_strides {cfg.out_strides} differ in length"
            )
        self.cfg = cfg
        by_stride: dict[int, list[str]] = {}
        for key in sorted(cfg.inputs, key=_by_tap_then_time):
            by_stride.setdefault(int(cfg.inputs[key][1]), []).append(key)
        self.keys_by_stride = dict(sorted(by_stride.items(), reverse=True))  # coarse -> fine
        out_width = dict(zip(cfg.out_strides, cfg.widths, strict=True))
        coarsest_in = max(self.keys_by_stride)
        finest_out = min(cfg.out_strides)
        # Strides coarser than the coarsest output keep its width (DIFF: 2048 at 1/64 and 1/32).
        strides = _powers_of_two_down(coarsest_in, finest_out)
        self.width = {s: out_width.get(s, out_width[max(cfg.out_strides)]) for s in strides}
        for s in strides:
            if s not in out_width and s < max(cfg.out_strides):
                raise ModelError(f"stride {s} lies between out_strides {cfg.out_strides}")
        self.bottleneck = nn.ModuleDict(
            {
                str(s): Bottleneck(sum(int(cfg.inputs[k][0]) for k in keys), self.width[s])
                for s, keys in self.keys_by_stride.items()
            }
        )
        self.up = nn.ModuleDict()
        self.refine = nn.ModuleDict()
        for coarse, fine in zip(strides[:-1], strides[1:], strict=True):
            self.up[str(fine)] = nn.ConvTranspose2d(self.width[coarse], self.width[fine], 2, 2)
            self.refine[str(fine)] = Bottleneck(self.width[fine], self.width[fine])
        self.strides = strides
        self.out_specs = [(self.width[s], s) for s in sorted(cfg.out_strides) if s in strides]

    def forward(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Return maps at the out strides present, fine to coarse."""
        outs: dict[int, torch.Tensor] = {}
        x: torch.Tensor | None = None
        for s in self.strides:
            local = None
            if s in self.keys_by_stride:
                local = self.bottleneck[str(s)](
                    torch.cat([features[k] for k in self.keys_by_stride[s]], dim=1)
                )
            if x is None:
                x = local
            else:
                x = self.up[str(s)](x)
                if local is not None:
                    # Odd sizes (1/64 of a 720-pixel side) leave up-sampled maps one pixel off.
                    x = resize(x, local.shape[-2:]) + local
                x = self.refine[str(s)](x)
            outs[s] = x
        return [outs[s] for _, s in self.out_specs]


class HyperfeatureAggregation(nn.Module):
    """Diffusion Hyperfeatures: a bottleneck per layer shared over t, softmax-mixed into one map."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        if not cfg.inputs:
            raise ModelError("HyperfeatureAggregation needs at least one input feature spec")
        self.cfg = cfg
        taps: dict[str, list[str]] = {}
        for key in sorted(cfg.inputs, key=_by_tap_then_time):
            taps.setdefault(FeatureKey.parse(key).tap, []).append(key)
        for tap, keys in taps.items():
            if len({int(cfg.inputs[k][0]) for k in keys}) != 1:
                raise ModelError(f"tap {tap!r} has different channel counts over timesteps")
        self.tap_names = list(taps)
        self.keys = [k for keys in taps.values() for k in keys]
        self.tap_of = [self.tap_names.index(FeatureKey.parse(k).tap) for k in self.keys]
        self.stride = min(int(v[1]) for v in cfg.inputs.values())
        # ModuleList indexed like tap_names: tap names contain dots, which ModuleDict forbids.
        self.bottlenecks = nn.ModuleList(
            Bottleneck(int(cfg.inputs[taps[t][0]][0]), cfg.channels) for t in self.tap_names
        )
        # One mixing logit per (layer, timestep) key; equal weights at init, as in the paper.
        self.mixing = nn.Parameter(torch.ones(len(self.keys)))
        self.out_specs = [(cfg.channels, self.stride)]

    def forward(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        weights = torch.softmax(self.mixing, dim=0)
        ref = next(features[k] for k in self.keys if int(self.cfg.inputs[k][1]) == self.stride)
        size = ref.shape[-2:]
        out = None
        for i, key in enumerate(self.keys):
            x = features[key]
            x = resize(x, size)
            y = weights[i] * self.bottlenecks[self.tap_of[i]](x)
            out = y if out is None else out + y
        return [out]


def _powers_of_two_down(start: int, stop: int) -> list[int]:
    out = []
    s = start
    while s >= stop:
        out.append(s)
        s //= 2
    if not out:
        raise ModelError(f"coarsest input stride {start} is finer than the finest output {stop}")
    return out


# Every fusion of cached features, by `train.fusion` (FusionConfig.kind): the one place a fusion
# is declared; train's Literal and check_params come from it, SegModel builds from it.
FUSIONS: dict[str, type[nn.Module]] = {
    "stride": StrideAggregation,  # ours: top-down through every stride
    "diff": DiffFinecoder,  # DIFF's direct aggregation + finecoder (1/64 dropped)
    "hyperfeatures": HyperfeatureAggregation,  # Diffusion Hyperfeatures' mixing
}
FusionKind = Literal[tuple(FUSIONS)]
