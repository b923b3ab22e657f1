"""Build the small SD-family model of the embedded default (SD-2.1's classes and block layout,
narrower), with an offline CLIP tokenizer; and the `model` params group."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipeline.core.params import STRICT
from pipeline.diffusion.model import (
    DiffusionModel,
    load_architecture,
    save_diffusion_model,
    write_pointer,
)

Positive = Annotated[int, Field(ge=1)]

# SD-2.1's scheduler (DDIM, scaled-linear betas, v-prediction), as in its scheduler_config.json.
SD21_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

# Words the offline tokenizer knows whole; any other word still tokenizes, as characters.
_VOCAB_WORDS = """
a an the of in on at and with photo picture image frame rendering render scene street streets city
cities road roads urban town europe european high quality clear day daytime night dark evening fog
foggy haze hazy mist misty rain rainy wet snow snowy video game games computer graphics synthetic
real realistic camera dashcam driving car view sunny cloudy weather condition bright lights lamps
headlights sidewalk building buildings wall fence pole traffic light sign vegetation tree trees terrain
grass sky person people pedestrian rider car cars truck bus train motorcycle bicycle bike
""".split()


@dataclass(config=STRICT)
class SmallModelConfig:
    """`model.small`: size of the built model (SD-2.1's layout; SD-2.1 is 320/640/1280/1280)."""

    vae_channels: list[Positive]
    vae_layers_per_block: Positive
    unet_channels: list[Positive]
    # As in SD-2.1's config, diffusers' `attention_head_dim` holds the heads per level.
    unet_heads: list[Positive]
    norm_num_groups: Positive
    text_hidden: Positive
    text_layers: Positive
    text_heads: Positive
    latent_channels: Positive
    prediction_type: Literal["epsilon", "v_prediction"]
    sample_size: Positive

    @model_validator(mode="after")
    def _levels(self) -> SmallModelConfig:
        if len(self.unet_heads) != len(self.unet_channels):
            raise ValueError("unet_heads needs one entry per unet_channels level")
        widths = [*self.vae_channels, *self.unet_channels]
        if any(c % self.norm_num_groups for c in widths):
            raise ValueError("every channel count must be a multiple of norm_num_groups")
        return self


@dataclass(config=STRICT)
class ModelConfig:
    """The `model` group: which diffusion model, and where and in which precision it runs."""

    source: str  # "build" (the small model of `small`) or a local diffusers folder (SD-2.1)
    dtype: Literal["fp32", "fp16", "bf16"]
    device: (
        str  # cpu | cuda | cuda:<n> | cuda:free[:<seconds to wait>] (a GPU no other stage holds)
    )
    small: SmallModelConfig
    # A UNet replacing the model's in extract, invert and tune_prompt: a diffusers UNet folder
    # (the cleandift stage's data/cleandift/unet) or a safetensors state dict of the same
    # architecture (CleanDIFT's cleandift_sd21_unet.safetensors); null: the model's own.
    unet: str | None

    @model_validator(mode="after")
    def _precision(self) -> ModelConfig:
        if self.device == "cpu" and self.dtype != "fp32":
            # Measured at 128x256 on SD-2.1 shapes: UNet 51 s vs 11 s, VAE 449 s vs 3 s.
            raise ValueError(
                f"dtype {self.dtype} on the CPU is 4-150x slower than fp32 there; use fp32 on a CPU"
            )
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(
                "device must be cpu, cuda, cuda:<n> or cuda:free[:<seconds>] (a GPU no other stage holds)"
            )
        return self


def build_tokenizer(extra_words: list[str] | None = None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer built offline: byte-level base tokens plus whole-word merges."""
    base = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in base + [b + "</w>" for b in base]:
        vocab.setdefault(tok, len(vocab))
    merges: dict[tuple[str, str], None] = {}
    for word in sorted(set(_VOCAB_WORDS) | {w.lower() for w in extra_words or []}):
        chars = list(word[:-1]) + [word[-1] + "</w>"]
        # A merge for every split of every substring: whichever merges BPE applies first, the
        # pieces stay substrings that merge on, so a known word always ends as one token.
        for length in range(2, len(chars) + 1):
            for start in range(len(chars) - length + 1):
                piece = chars[start : start + length]
                for cut in range(1, length):
                    merges[("".join(piece[:cut]), "".join(piece[cut:]))] = None
                vocab.setdefault("".join(piece), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77)


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte -> printable-character table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def build_small_model(cfg: SmallModelConfig, seed: int) -> DiffusionModel:
    """Random-init small model of the SD-2.1 family (same classes and block types)."""
    torch.manual_seed(seed)
    levels = len(cfg.unet_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
        scaling_factor=0.18215,
    )
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            intermediate_size=4 * cfg.text_hidden,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=77,
            projection_dim=cfg.text_hidden,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=cfg.sample_size // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=2,
        attention_head_dim=tuple(cfg.unet_heads),
        cross_attention_dim=cfg.text_hidden,
        norm_num_groups=cfg.norm_num_groups,
        use_linear_projection=True,
        upcast_attention=True,
    )
    scheduler = DDIMScheduler(**{**SD21_SCHEDULER, "prediction_type": cfg.prediction_type})
    for part in (vae, unet, text_encoder):  # frozen like a loaded model; training opts in
        part.eval().requires_grad_(False)
    return DiffusionModel(
        tokenizer,
        scheduler,
        dict(vae.config),
        dict(unet.config),
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
    )


def build_model_folder(cfg: ModelConfig, seed: int, out: str | os.PathLike[str]) -> str:
    """The build_model stage: the small model (random init), or a checked pointer to a folder."""
    if cfg.source == "build":
        fp = save_diffusion_model(build_small_model(cfg.small, seed=seed), out)
        print(f"build_model: small model (random init) -> {out} (fingerprint {fp})")
    else:
        # Hashed once here; later stages trust the pointer while the files are unchanged.
        fp = write_pointer(cfg.source, out)
        print(f"build_model: pointer to {cfg.source} -> {out} (fingerprint {fp})")
    return fp


def model_architecture(cfg: ModelConfig, seed: int = 0) -> DiffusionModel:
    """The model `cfg` names, weightless (parts on the meta device): its configs, tokenizer,
    scheduler and UNet, for checks before any stage runs."""
    if cfg.source != "build":
        return load_architecture(cfg.source)
    with torch.device("meta"):
        return build_small_model(cfg.small, seed)


def sd21_architecture() -> DiffusionModel:
    """SD-2.1's architecture from `sd21/`, weightless: what a plan needs when the SD-2.1
    folder is not on this machine."""
    return DiffusionModel(
        build_tokenizer(),
        DDIMScheduler.from_config(DDIMScheduler.load_config(SD21_CONFIGS / "scheduler")),
        AutoencoderKL.load_config(SD21_CONFIGS / "vae"),
        UNet2DConditionModel.load_config(SD21_CONFIGS / "unet"),
        unet=sd21_unet("meta"),
        source=str(SD21_CONFIGS),
    )


# The public diffusers configs of SD-2.1's components (768, v-prediction), no weights.
SD21_CONFIGS = Path(__file__).resolve().parent / "sd21"


def build_sd21_model(seed: int, dtype: torch.dtype = torch.float16) -> DiffusionModel:
    """SD-2.1's architecture from `sd21/` with random weights (for rehearsals and benchmarks:
    the architecture sets the cost), the offline tokenizer, SD-2.1's scheduler."""
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD21_CONFIGS / "vae"))
    unet = sd21_unet("cpu")
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD21_CONFIGS / "text_encoder"))
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(SD21_CONFIGS / "scheduler"))
    for part in (vae, unet, text_encoder):
        part.to(dtype).eval().requires_grad_(False)
    return DiffusionModel(
        build_tokenizer(),
        scheduler,
        dict(vae.config),
        dict(unet.config),
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
    )


def sd21_unet(device: str | torch.device = "meta") -> UNet2DConditionModel:
    """SD-2.1's UNet architecture from its config: weightless on `meta`, random elsewhere."""
    with torch.device(device):
        return UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(SD21_CONFIGS / "unet")
        )


def random_sd21_folder(folder: Path) -> Path:
    """A diffusers folder of SD-2.1's architecture with random weights (fp16 safetensors,
    2.5 GB) at `folder`, built once: what the rehearsal and the benchmarks run on (the
    architecture, not the weights, sets the cost)."""
    if not (folder / "model_index.json").is_file():
        save_diffusion_model(build_sd21_model(seed=0), folder)
    return folder
