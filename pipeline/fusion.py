"""Fusion of cached multi-layer, multi-timestep diffusion features into multi-scale maps.

Two recipes (DESIGN.md §6): DIFF's per-stride direct aggregation with the top-down
"finecoder", and the Diffusion Hyperfeatures aggregation (one bottleneck per layer shared over
timesteps, softmax mixing weights per (layer, timestep)). Inputs are the reader's feature dict,
keys "t{t}/{tap}", each value (B, C, h, w) at a known output stride.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ModelError

_KEY = re.compile(r"^t(\d+)/(.+)$")


@dataclass
class FusionConfig:
    """Which fusion, its input specs and its widths (the SD-2.1 recipe uses DIFF's widths)."""

    kind: str = "stride"  # stride | hyperfeatures | pixels (the from-scratch baseline)
    # {"t{t}/{tap}": [channels, stride]}: filled from the store's tap specs.
    inputs: dict[str, list[int]] = field(default_factory=dict)
    # stride: widths of the finecoder outputs at out_strides (DIFF: 256/512/1024/2048 @ 4/8/16/32).
    out_strides: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    # hyperfeatures: one map of `channels` at the finest input stride (the paper: 384).
    channels: int = 64


def parse_key(key: str) -> tuple[int, str]:
    """Split "t{t}/{tap}" into (t, tap)."""
    m = _KEY.match(key)
    if m is None:
        raise ModelError(f"feature key {key!r} is not of the form 't<timestep>/<tap>'")
    return int(m.group(1)), m.group(2)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 32 that divides `channels`."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, GroupNorm) with a projection shortcut."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None) -> None:
        super().__init__()
        mid = mid_ch or max(out_ch // 4, 8)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.norm1 = group_norm(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.norm2 = group_norm(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.norm3 = group_norm(out_ch)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), group_norm(out_ch))
            if in_ch != out_ch
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


class StrideAggregation(nn.Module):
    """DIFF's direct aggregation: per stride concat(layers x timesteps) -> bottleneck -> finecoder."""

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
        for key in sorted(cfg.inputs, key=lambda k: (parse_key(k)[1], parse_key(k)[0])):
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
                    x = _match(x, local) + local
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
        for key in sorted(cfg.inputs, key=lambda k: (parse_key(k)[1], parse_key(k)[0])):
            taps.setdefault(parse_key(key)[1], []).append(key)
        for tap, keys in taps.items():
            if len({int(cfg.inputs[k][0]) for k in keys}) != 1:
                raise ModelError(f"tap {tap!r} has different channel counts over timesteps")
        self.tap_names = list(taps)
        self.keys = [k for keys in taps.values() for k in keys]
        self.tap_of = [self.tap_names.index(parse_key(k)[1]) for k in self.keys]
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
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = weights[i] * self.bottlenecks[self.tap_of[i]](x)
            out = y if out is None else out + y
        return [out]


def build_fusion(cfg: FusionConfig) -> nn.Module:
    """The fusion module named by cfg.kind; it exposes `out_specs` [(channels, stride)]."""
    if cfg.kind == "stride":
        return StrideAggregation(cfg)
    if cfg.kind == "hyperfeatures":
        return HyperfeatureAggregation(cfg)
    if cfg.kind == "pixels":
        from pipeline.baselines import PixelEncoder  # the from-scratch baseline's encoder

        return PixelEncoder(cfg)
    raise ModelError(f"unknown fusion kind {cfg.kind!r} (stride | hyperfeatures | pixels)")


def fusion_config(values: dict) -> FusionConfig:
    """FusionConfig from a JSON dict (lists for specs)."""
    names = {f.name for f in dataclasses.fields(FusionConfig)}
    cfg = FusionConfig(**{k: v for k, v in values.items() if k in names})
    cfg.inputs = {k: [int(c), int(s)] for k, (c, s) in cfg.inputs.items()}
    return cfg


def _powers_of_two_down(start: int, stop: int) -> list[int]:
    out = []
    s = start
    while s >= stop:
        out.append(s)
        s //= 2
    if not out:
        raise ModelError(f"coarsest input stride {start} is finer than the finest output {stop}")
    return out


def _match(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    # Odd feature sizes (e.g. 1/64 of a 720-pixel side) make up-sampled maps one pixel off.
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)
