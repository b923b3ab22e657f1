"""Which UNet layers to read features from (presets or module paths), and a hook recorder."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel

from pipeline.core.errors import ModelError


@dataclasses.dataclass(frozen=True)
class Tap:
    """One tapped layer: its output is a (B, channels, H/stride, W/stride) map of an H×W image."""

    name: str
    module_path: str
    stride: int
    channels: int
    tokens: bool = False  # the module outputs (B, h*w, C) tokens, reshaped to (B, C, h, w)


def _resnets(unet: UNet2DConditionModel) -> dict[str, str]:
    return {
        f"up{i}_res{j}": f"up_blocks.{i}.resnets.{j}.conv2"  # residual branch, before the skip add
        for i, block in enumerate(unet.up_blocks)
        for j in range(len(block.resnets))
    }


def _attentions(unet: UNet2DConditionModel) -> dict[str, str]:
    return {
        f"up{i}_attn{j}": f"up_blocks.{i}.attentions.{j}.transformer_blocks.0"
        for i, block in enumerate(unet.up_blocks)
        for j in range(len(getattr(block, "attentions", None) or []))
    }


def diff_paths(unet: UNet2DConditionModel) -> dict[str, str]:
    """DIFF's taps, grouped by up block (= output stride): each block's ResNets, then its
    attentions."""
    resnets, attns = _resnets(unet), _attentions(unet)
    return {
        name: path
        for i in range(len(unet.up_blocks))
        for group in (resnets, attns)
        for name, path in group.items()
        if name.startswith(f"up{i}_")
    }


def cleandift_paths(unet: UNet2DConditionModel) -> dict[str, str]:
    """CleanDIFT's feature keys (SD21UNetFeatureExtractor, sd_feature_extraction.py:96-175):
    the mid block, then every layer of the up blocks (a CrossAttn block's attention output, an
    UpBlock2D's ResNet; a block's last layer after its upsampler, min_sd21.py:342-345), the
    last block's first layer only (us10; us11 and the final layer are not returned)."""
    out = {"mid": "mid_block"}
    ups = unet.up_blocks
    for i, block in enumerate(ups):
        attns = getattr(block, "attentions", None)
        layers = len(block.resnets) if i < len(ups) - 1 else 1
        for j in range(layers):
            path = f"up_blocks.{i}.{'attentions' if attns else 'resnets'}.{j}"
            if j == len(block.resnets) - 1 and block.upsamplers:
                path = f"up_blocks.{i}.upsamplers.0"
            out[f"us{len(out)}"] = path
    return out


# Every named tap preset (`extract.taps`): the one place a preset is declared; ExtractConfig's
# check comes from it (docs/design.md, "Method facts").
PRESETS: dict[str, Callable[[UNet2DConditionModel], dict[str, str]]] = {
    "diff": diff_paths,
    "hyperfeatures": _resnets,
    "vpd": lambda unet: {f"up{i}_out": f"up_blocks.{i}" for i in range(len(unet.up_blocks))},
    "dift": lambda unet: {"up1_out": "up_blocks.1"},
    "cleandift": cleandift_paths,
}


def preset_paths(unet: UNet2DConditionModel, preset: str) -> dict[str, str]:
    """Tap name -> module path for a named preset."""
    if preset not in PRESETS:
        raise ModelError(
            f"unknown tap preset {preset!r}; expected one of {list(PRESETS)} or module paths"
        )
    return PRESETS[preset](unet)


_TAPPABLE = re.compile(
    r"(down_blocks|up_blocks)\.\d+|mid_block"
    r"|.*resnets\.\d+(\.conv2)?|.*attentions\.\d+(\.transformer_blocks\.\d+)?"
)


def tappable_paths(unet: torch.nn.Module) -> list[str]:
    """The module paths worth tapping: blocks, ResNets (and their conv2), transformer blocks."""
    return [name for name, _ in unet.named_modules() if _TAPPABLE.fullmatch(name)]


def resolve_taps(
    unet: UNet2DConditionModel, spec: str | list[str], vae_stride: int = 8
) -> list[Tap]:
    """Taps of a preset name or a list of module paths, with strides and channels from a probe pass."""
    if isinstance(spec, str):
        named = preset_paths(unet, spec)
    else:
        modules = dict(unet.named_modules())
        missing = [p for p in spec if p not in modules]
        if missing:
            raise ModelError(
                f"tap module path(s) {missing} not in the UNet; valid paths: "
                + ", ".join(tappable_paths(unet))
            )
        named = {p: p for p in spec}
    side = _probe_side(unet)
    shapes = _probe_shapes(unet, list(named.values()), side)
    latent = side * vae_stride
    taps = []
    for name, path in named.items():
        shape = shapes.get(path)
        if shape is None:
            raise ModelError(f"tap {path!r} produced no tensor output in a UNet forward pass")
        if len(shape) == 3:  # (B, h*w, C) tokens at a square probe latent
            token_side = int(round(shape[1] ** 0.5))
            taps.append(Tap(name, path, latent // token_side, int(shape[2]), tokens=True))
        elif len(shape) == 4:
            taps.append(Tap(name, path, latent // int(shape[2]), int(shape[1])))
        else:
            raise ModelError(f"tap {path!r} outputs shape {shape}, not a feature map")
    return taps


def _probe_side(unet: torch.nn.Module) -> int:
    # The smallest square latent every level of this UNet can halve down to (at least 1x1).
    return 2 ** int(getattr(unet, "num_upsamplers", 3))


def _probe_shapes(unet: torch.nn.Module, paths: list[str], side: int) -> dict[str, tuple[int, ...]]:
    # One batch-1 pass of the UNet itself at the smallest latent, stopped after the last tap:
    # 20 ms for the default model, where a weightless ghost copy on the meta device cost 0.3 s
    # of Python shape logic in every extract. A UNet already on the meta device works too.
    param = next(unet.parameters())
    cross = unet.config.cross_attention_dim
    dim = cross if isinstance(cross, int) else cross[0]
    kw = {"device": param.device, "dtype": param.dtype}
    sample = torch.zeros(1, unet.config.in_channels, side, side, **kw)
    context = torch.zeros(1, 77, dim, **kw)
    with torch.inference_mode(), TapRecorder(unet, {p: p for p in paths}, stop_early=True) as rec:
        try:
            unet(sample, torch.tensor([1], device=param.device), context)
        except StopForward:
            pass
    return {p: tuple(t.shape) for p, t in rec.raw.items()}


def _tensor_of(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


class StopForward(Exception):
    """Raised by the recorder after the last tap fired, to skip the rest of the UNet."""


class TapRecorder(contextlib.AbstractContextManager):
    """Forward hooks that keep each tapped module's output (name -> tensor) while active."""

    def __init__(
        self, unet: torch.nn.Module, named_paths: dict[str, str], stop_early: bool = False
    ) -> None:
        self.unet = unet
        self.named_paths = named_paths
        self.stop_early = stop_early
        self.raw: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> TapRecorder:
        modules = dict(self.unet.named_modules())
        for name, path in self.named_paths.items():
            self._handles.append(modules[path].register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, args: object, output: object) -> None:
            tensor = _tensor_of(output)
            if tensor is not None:
                self.raw[name] = tensor
            if self.stop_early and len(self.raw) == len(self.named_paths):
                raise StopForward

        return hook

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def as_maps(
    raw: dict[str, torch.Tensor], taps: list[Tap], latent_hw: tuple[int, int], vae_stride: int = 8
) -> dict[str, torch.Tensor]:
    """Reshape token outputs (B, h*w, C) to (B, C, h, w); image size = latent size × vae_stride."""
    maps = {}
    for tap in taps:
        x = raw[tap.name]
        if tap.tokens:
            h = latent_hw[0] * vae_stride // tap.stride
            w = latent_hw[1] * vae_stride // tap.stride
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        maps[tap.name] = x
    return maps
