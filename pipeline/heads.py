"""Segmentation heads on fused feature maps, and SegModel = fusion + head (diffusers-style I/O)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.classes import NUM_CLASSES
from pipeline.errors import ModelError
from pipeline.fileio import atomic_path
from pipeline.fusion import FusionConfig, build_fusion, fusion_config, group_norm

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class HeadConfig:
    """Head kind and sizes (DAFormer: embed_dim 256, dilations 1/6/12/18, dropout 0.1)."""

    kind: str = "daformer"  # daformer | mlp
    embed_dim: int = 64
    dilations: list[int] = field(default_factory=lambda: [1, 6, 12, 18])
    dropout: float = 0.1
    num_classes: int = NUM_CLASSES
    # GroupNorm by default: batches are a few crops, and BatchNorm's source-domain running
    # statistics shift under a domain gap; "bn" gives DAFormer's original choice.
    norm: str = "gn"


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(ch)
    if kind == "gn":
        return group_norm(ch)
    raise ModelError(f"unknown norm {kind!r} (gn | bn)")


def _conv_norm_act(in_ch: int, out_ch: int, k: int, norm: str, **kw: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, k, bias=False, **kw), _norm(norm, out_ch), nn.ReLU(inplace=True)
    )


class SeparableASPP(nn.Module):
    """DAFormer's ASPP context fusion: 1x1 branch + depthwise-separable dilated 3x3 branches."""

    def __init__(self, in_ch: int, ch: int, dilations: list[int], norm: str) -> None:
        super().__init__()
        branches = []
        for d in dilations:
            if d == 1:
                branches.append(_conv_norm_act(in_ch, ch, 1, norm))
            else:
                branches.append(
                    nn.Sequential(
                        _conv_norm_act(in_ch, in_ch, 3, norm, padding=d, dilation=d, groups=in_ch),
                        _conv_norm_act(in_ch, ch, 1, norm),
                    )
                )
        self.branches = nn.ModuleList(branches)
        self.bottleneck = _conv_norm_act(len(dilations) * ch, ch, 3, norm, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([b(x) for b in self.branches], dim=1))


class DAFormerHead(nn.Module):
    """Per-input MLP embedding, resize to the finest map, concat, separable ASPP, classifier."""

    def __init__(self, in_specs: list[tuple[int, int]], cfg: HeadConfig) -> None:
        super().__init__()
        self.embed = nn.ModuleList(nn.Conv2d(c, cfg.embed_dim, 1) for c, _ in in_specs)
        self.fuse = SeparableASPP(
            len(in_specs) * cfg.embed_dim, cfg.embed_dim, cfg.dilations, cfg.norm
        )
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(cfg.embed_dim, cfg.num_classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        x = torch.cat([_resize(e(m), size) for e, m in zip(self.embed, maps, strict=True)], dim=1)
        return self.classifier(self.dropout(self.fuse(x)))


class MLPHead(nn.Module):
    """SegFormer-like light head: per-input linear embedding, concat, 1x1 fuse, classifier."""

    def __init__(self, in_specs: list[tuple[int, int]], cfg: HeadConfig) -> None:
        super().__init__()
        self.embed = nn.ModuleList(nn.Conv2d(c, cfg.embed_dim, 1) for c, _ in in_specs)
        self.fuse = _conv_norm_act(len(in_specs) * cfg.embed_dim, cfg.embed_dim, 1, cfg.norm)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(cfg.embed_dim, cfg.num_classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        x = torch.cat([_resize(e(m), size) for e, m in zip(self.embed, maps, strict=True)], dim=1)
        return self.classifier(self.dropout(self.fuse(x)))


def build_head(in_specs: list[tuple[int, int]], cfg: HeadConfig) -> nn.Module:
    """The head named by cfg.kind on maps of the given (channels, stride), fine to coarse."""
    if cfg.kind == "daformer":
        return DAFormerHead(in_specs, cfg)
    if cfg.kind == "mlp":
        return MLPHead(in_specs, cfg)
    raise ModelError(f"unknown head kind {cfg.kind!r} (daformer | mlp)")


class SegModel(nn.Module):
    """Fusion + head: features dict {"t{t}/{tap}": (B,C,h,w)} -> logits (B, classes, H/s, W/s)."""

    def __init__(self, fusion: FusionConfig, head: HeadConfig) -> None:
        super().__init__()
        self.fusion_config = fusion
        self.head_config = head
        self.fusion = build_fusion(fusion)
        specs = self.fusion.out_specs
        self.head = build_head(specs, head)
        self.output_stride = min(s for _, s in specs)

    @property
    def input_specs(self) -> dict[str, tuple[int, int]]:
        """{key: (channels, stride)} of the features this model reads."""
        return {k: (int(c), int(s)) for k, (c, s) in self.fusion_config.inputs.items()}

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = sorted(set(self.fusion_config.inputs) - set(features))
        if missing:
            raise ModelError(f"features lack keys {missing} that the model was built for")
        return self.head(self.fusion(features))

    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "fusion": dataclasses.asdict(self.fusion_config),
            "head": dataclasses.asdict(self.head_config),
        }

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write config.json and model.safetensors into `directory` (atomically)."""
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2) + "\n")
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu"
    ) -> SegModel:
        """Load a folder written by save_pretrained (safetensors only)."""
        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise ModelError(f"{p}: missing (not a SegModel folder written by save_pretrained)")
        try:
            cfg = json.loads(cfg_path.read_text())
            model = cls(fusion_config(cfg["fusion"]), head_config(cfg["head"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{cfg_path}: invalid SegModel config ({e})") from e
        try:
            model.load_state_dict(load_file(str(w_path), device=str(device)))
        except (RuntimeError, OSError) as e:
            raise ModelError(f"{w_path}: weights do not match the config ({e})") from e
        return model.to(device)


def head_config(values: dict) -> HeadConfig:
    """HeadConfig from a JSON dict."""
    names = {f.name for f in dataclasses.fields(HeadConfig)}
    return HeadConfig(**{k: v for k, v in values.items() if k in names})


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
