"""SegModel = fusion + head: cached features in, logits out; saved diffusers-style (config.json +
model.safetensors)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.core.errors import ConfigError, ModelError
from pipeline.core.fileio import atomic_path, digest_problem, record_digest
from pipeline.core.params import validate
from pipeline.heads.decoders import HeadConfig, build_head
from pipeline.heads.fusion import FUSIONS, FusionConfig
from pipeline.heads.pixel_cnn import PixelEncoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def build_fusion(cfg: FusionConfig) -> nn.Module:
    """The fusion module of cfg.kind; it exposes `out_specs` [(channels, stride)], fine to coarse."""
    if cfg.kind == "pixels":
        return PixelEncoder(cfg)
    if cfg.kind not in FUSIONS:
        raise ModelError(f"unknown fusion kind {cfg.kind!r} (one of {[*FUSIONS, 'pixels']})")
    return FUSIONS[cfg.kind](cfg)


class SegModel(nn.Module):
    """Fusion + head: features {str(FeatureKey): (B,C,h,w)} -> logits (B, classes, H/s, W/s)."""

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
        """Write config.json and model.safetensors into `directory` (atomically), each with its
        recorded sha256 (checked by from_pretrained and `verify`)."""
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2) + "\n")
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                record_digest(tmp / name)

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
            problem = digest_problem(p)
            if problem is not None:
                raise ModelError(f"{p}: {problem}; retrain (or `dvc checkout {directory}`)")
        try:
            cfg = json.loads(cfg_path.read_text())
            if cfg.get("format_version") != FORMAT_VERSION:
                raise ModelError(
                    f"{cfg_path}: format version {cfg.get('format_version')}, "
                    f"expected {FORMAT_VERSION}; retrain"
                )
            fusion = validate(cfg["fusion"], FusionConfig, "fusion", str(cfg_path))
            head = validate(cfg["head"], HeadConfig, "head", str(cfg_path))
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ModelError(f"{cfg_path}: invalid SegModel config ({e})") from e
        model = cls(fusion, head)
        try:
            weights = load_file(str(w_path), device=str(device))
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{w_path}: unreadable weights, truncated or corrupt ({e})") from None
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise ModelError(f"{w_path}: weights do not match the config ({e})") from e
        return model.to(device)
