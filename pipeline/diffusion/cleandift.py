"""CleanDIFT's alignment (Stracke et al., CVPR 2025; CompVis/cleandift): the timestep-conditioned
projection heads on the clean UNet's features, the teacher's stratified timesteps and the loss.

Line numbers cite CompVis/cleandift at b070976: src/layers.py, src/sd_feature_extraction.py and
configs/sd21_feature_extractor.yaml. Only the training uses the heads; features are read from
the fine-tuned UNet itself (get_features with t=None, sd_feature_extraction.py:466-485).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# configs/sd21_feature_extractor.yaml:26-37: mapping depth 2, width 256, d_ff 768; adapters
# FFNStack depth 3, ffn_expansion 1; t_max_model 999 (sd_feature_extraction.py:243)
MAPPING_DEPTH, MAPPING_WIDTH, MAPPING_FF = 2, 256, 768
ADAPTER_DEPTH = 3
T_MAX_MODEL = 999


def rms_norm(x: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """layers.py:44-48, in float32 at least."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), torch.float32)
    mean_sq = torch.mean(x.to(dtype) ** 2, dim=-1, keepdim=True)
    return x * (scale.to(dtype) * torch.rsqrt(mean_sq + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale)


class AdaRMSNorm(nn.Module):
    """layers.py:50-60: the scale is 1 + a zero-initialised linear map of the condition."""

    def __init__(self, dim: int, cond_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cond_dim, dim, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return rms_norm(x, self.linear(cond)[:, None, :] + 1)


class FeedForward(nn.Module):
    """layers.py:9-29: x + down(SwiGLU(up(norm(x)))), the down projection zero-initialised, so
    every head starts as the identity."""

    def __init__(self, dim: int, hidden: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.norm = RMSNorm(dim) if cond_dim is None else AdaRMSNorm(dim, cond_dim)
        self.up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        h = self.norm(x) if cond is None else self.norm(x, cond)
        h, gate = self.up(h).chunk(2, dim=-1)  # linear_swiglu, layers.py:77-82
        return x + self.down(h * F.silu(gate))


class TimeMapping(nn.Module):
    """t / 999 -> Fourier features -> linear -> mapping network (sd_feature_extraction.py:273-276,
    401-406; layers.py:62-74, 98-106)."""

    def __init__(self, width: int = MAPPING_WIDTH) -> None:
        super().__init__()
        self.register_buffer("fourier", torch.randn(width // 2, 1))
        self.proj = nn.Linear(width, width, bias=False)
        self.in_norm = RMSNorm(width)
        self.blocks = nn.ModuleList(FeedForward(width, MAPPING_FF) for _ in range(MAPPING_DEPTH))
        self.out_norm = RMSNorm(width)

    def forward(self, t: Tensor) -> Tensor:
        f = 2 * math.pi * (t.float()[:, None] / T_MAX_MODEL) @ self.fourier.T
        x = self.in_norm(self.proj(torch.cat([f.cos(), f.sin()], dim=-1)))
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


class ProjectionHeads(nn.Module):
    """One FFN stack per feature key, conditioned on the teacher's timestep: the clean features
    mapped to what the frozen model gives at t (FFNStack, sd_feature_extraction.py:185-196)."""

    def __init__(self, channels: dict[str, int]) -> None:
        super().__init__()
        self.mapping = TimeMapping()
        self.heads = nn.ModuleDict(
            {
                k: nn.ModuleList(FeedForward(c, c, MAPPING_WIDTH) for _ in range(ADAPTER_DEPTH))
                for k, c in channels.items()
            }
        )

    def forward(self, feats: dict[str, Tensor], t: Tensor) -> dict[str, Tensor]:
        """Maps (B, C, h, w) per key and timesteps (B,) -> tokens (B, h*w, C) per key."""
        cond = self.mapping(t)
        out = {}
        for k, x in feats.items():
            x = x.flatten(2).transpose(1, 2)
            for layer in self.heads[k]:
                x = layer(x, cond)
            out[k] = x
        return out


def stratified_timesteps(
    batch: int, bins: int, t_min: int, t_max: int, generator: torch.Generator
) -> Tensor:
    """(batch, bins) teacher timesteps, one drawn uniformly in each of `bins` equal slices of
    [t_min, t_max), floored (sd_feature_extraction.py:358-364)."""
    width = (t_max - t_min) / bins
    u = torch.rand((batch, bins), generator=generator)
    return (t_min + u * width + torch.arange(bins)[None, :] * width).long()


def alignment_loss(student: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
    """Sum over keys of the mean negative cosine similarity over channels, per token
    (sd_feature_extraction.py:423-427; train.py:63 sums the keys' means)."""
    total = torch.zeros(())
    for k, target in teacher.items():
        tokens = target.flatten(2).transpose(1, 2).detach()
        total = total - F.cosine_similarity(student[k], tokens.to(student[k]), dim=-1).mean()
    return total
