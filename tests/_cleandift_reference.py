"""CleanDIFT's own code (github.com/CompVis/cleandift at b070976), transcribed as it is written so
tests can pin the project against it on small inputs. Each piece names its file and lines; only
the plumbing (hydra, compile, CUDA) is left out, and einops' rearranges are written as
reshapes. Do not "fix" anything here.
"""

from __future__ import annotations

import math
from functools import reduce

import torch
import torch.nn.functional as F
from torch import nn

# configs/sd21_feature_extractor.yaml: lr (:6), data.batch_size and img_size (:14-15),
# lr_scheduler constant_with_warmup with num_warmup_steps 2000 (:55-57); train.py:28-36 builds
# torch.optim.Adam(lr) and transformers' get_scheduler from them.
CONFIG = {"lr": 1e-5, "batch_size": 8, "img_size": 768, "num_warmup_steps": 2000}


def zero_init(layer):  # src/utils.py
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def rms_norm(x, scale, eps):  # src/layers.py:44-48
    dtype = reduce(torch.promote_types, (x.dtype, scale.dtype, torch.float32))
    mean_sq = torch.mean(x.to(dtype) ** 2, dim=-1, keepdim=True)
    scale = scale.to(dtype) * torch.rsqrt(mean_sq + eps)
    return x * scale.to(x.dtype)


class RMSNorm(nn.Module):  # src/layers.py:31-41
    def __init__(self, shape, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(shape))

    def forward(self, x):
        return rms_norm(x, self.scale, self.eps)


class AdaRMSNorm(nn.Module):  # src/layers.py:50-60
    def __init__(self, features, cond_features, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.linear = zero_init(nn.Linear(cond_features, features, bias=False))

    def forward(self, x, cond):
        return rms_norm(x, self.linear(cond)[:, None, :] + 1, self.eps)


def linear_swiglu(x, weight, bias=None):  # src/layers.py:77-82
    x = x @ weight.mT
    if bias is not None:
        x = x + bias
    x, gate = x.chunk(2, dim=-1)
    return x * F.silu(gate)


class LinearSwiGLU(nn.Linear):  # src/layers.py:84-90
    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features * 2, bias=bias)
        self.out_features = out_features

    def forward(self, x):
        return linear_swiglu(x, self.weight, self.bias)


class FeedForwardBlock(nn.Module):  # src/layers.py:9-29 (dropout 0)
    def __init__(self, d_model, d_ff, d_cond_norm=None):
        super().__init__()
        if d_cond_norm is not None:
            self.norm = AdaRMSNorm(d_model, d_cond_norm)
        else:
            self.norm = RMSNorm(d_model)
        self.up_proj = LinearSwiGLU(d_model, d_ff, bias=False)
        self.down_proj = zero_init(nn.Linear(d_ff, d_model, bias=False))

    def forward(self, x, cond_norm=None, **kwargs):
        skip = x
        if cond_norm is not None:
            x = self.norm(x, cond_norm)
        else:
            x = self.norm(x)
        x = self.up_proj(x)
        x = self.down_proj(x)
        return x + skip


class MappingNetwork(nn.Module):  # src/layers.py:62-74
    def __init__(self, n_layers, d_model, d_ff):
        super().__init__()
        self.in_norm = RMSNorm(d_model)
        self.blocks = nn.ModuleList([FeedForwardBlock(d_model, d_ff) for _ in range(n_layers)])
        self.out_norm = RMSNorm(d_model)

    def forward(self, x):
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        x = self.out_norm(x)
        return x


class FourierFeatures(nn.Module):  # src/layers.py:98-106
    def __init__(self, in_features, out_features, std=1.0):
        super().__init__()
        self.register_buffer("weight", torch.randn([out_features // 2, in_features]) * std)

    def forward(self, input):
        f = 2 * math.pi * input @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)


class FFNStack(nn.Module):  # src/sd_feature_extraction.py:185-196 (AdaRMS, gating)
    def __init__(self, dim, depth, ffn_expansion, dim_cond):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                FeedForwardBlock(d_model=dim, d_ff=int(dim * ffn_expansion), d_cond_norm=dim_cond)
                for _ in range(depth)
            ]
        )

    def forward(self, x, cond):
        for layer in self.layers:
            x = layer(x, cond_norm=cond)
        return x


def stratified_t(B, t_min, t_max, bins, rand):  # src/sd_feature_extraction.py:358-364
    t_range = t_max - t_min
    t_range_per_bin = t_range / bins
    return (
        t_min + rand * t_range_per_bin + torch.arange(0, bins)[None, :] * t_range_per_bin
    ).long()


def adapted_loss(feats_cleandift, feats_base, t, adapters, time_emb, time_in_proj, mapping):
    """src/sd_feature_extraction.py:380-427: (B N_T) D H W maps -> B N_T (H W) D, the adapters
    on the time condition of t / 999, the negative cosine similarity; train.py:63 sums keys."""
    B, N_T = t.shape

    def tokens(v):
        return v.reshape(B, N_T, v.shape[1], -1).transpose(2, 3)

    base = {k: tokens(v) for k, v in feats_base.items()}
    clean = {k: tokens(v) for k, v in feats_cleandift.items()}
    map_cond = mapping(time_in_proj(time_emb(t.reshape(B * N_T, 1).float() / 999)))
    clean = {
        k: adapters[k](v.reshape(B * N_T, *v.shape[2:]), cond=map_cond).reshape(
            B, N_T, *v.shape[2:]
        )
        for k, v in clean.items()
    }
    losses = {
        f"neg_cossim_{k}": -F.cosine_similarity(clean[k], v.detach(), dim=-1).mean()
        for k, v in base.items()
    }
    return sum(v.mean() for v in losses.values())
