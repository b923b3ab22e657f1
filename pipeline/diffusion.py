"""SD-family diffusion models: build the small default, save, load (SD-2.1 the same way), encode."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipeline.errors import ModelError
from pipeline.fileio import atomic_path, write_json

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("vae", "unet", "text_encoder")
POINTER_FILE = "pointer.json"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# Keys that change with library versions or save location, not with what the model computes.
_VOLATILE_KEYS = {"_diffusers_version", "transformers_version", "_name_or_path", "_commit_hash"}

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


@dataclasses.dataclass
class SmallModelConfig:
    """Size of the small SD-family model of the embedded default (SD-2.1 block layout, narrower)."""

    vae_channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64, 64])
    vae_layers_per_block: int = 1
    # Sized to pretrain within the default run's CPU budget (issue 8); SD-2.1 is 320/640/1280/1280.
    unet_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 32, 64, 64])
    # Like SD-2.1's config, diffusers' `attention_head_dim` holds the number of heads per level
    # (here 32 channels per head; SD-2.1 has 64).
    unet_heads: list[int] = dataclasses.field(default_factory=lambda: [1, 1, 2, 2])
    norm_num_groups: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    latent_channels: int = 4
    prediction_type: str = "v_prediction"
    sample_size: int = 128


def tiny_model_config() -> SmallModelConfig:
    """The smallest model of the same layout, for tests and smoke runs (seconds on CPU)."""
    return SmallModelConfig(
        vae_channels=[8, 8, 8, 8],
        unet_channels=[8, 16, 32, 32],
        unet_heads=[1, 1, 2, 2],
        norm_num_groups=4,
        text_hidden=16,
        text_layers=1,
        text_heads=1,
        sample_size=64,
    )


@dataclasses.dataclass
class DiffusionModel:
    """The parts of an SD-family pipeline this project uses, plus a content fingerprint."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    fingerprint: str = "unsaved"
    source: str = ""

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_stride(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: str | torch.device) -> DiffusionModel:
        for part in (self.vae, self.unet, self.text_encoder):
            part.to(device)
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
    return DiffusionModel(vae, unet, text_encoder, tokenizer, scheduler)


def save_diffusion_model(model: DiffusionModel, path: str | os.PathLike[str]) -> str:
    """Write `model` as a diffusers folder (safetensors) atomically; set and return its fingerprint."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        model.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        model.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        model.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        # vocab.json + merges.txt too, as in SD's folders (older transformers read only these).
        model.tokenizer.backend_tokenizer.model.save(str(tmp / "tokenizer"))
        model.scheduler.save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "vae": ["diffusers", "AutoencoderKL"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", type(model.scheduler).__name__],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    model.fingerprint = fingerprint(path)
    model.source = str(path)
    return model.fingerprint


def write_pointer(target: str | os.PathLike[str], path: str | os.PathLike[str]) -> str:
    """Check that `target` loads as a model folder, then write `path`/pointer.json naming it."""
    target = Path(target).resolve()
    model = load_diffusion_model(target)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        write_json(tmp / POINTER_FILE, {"target": str(target), "fingerprint": model.fingerprint})
    return model.fingerprint


def resolve_model_folder(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """Follow a pointer folder (pointer.json) to the real model folder; return it and the pinned fingerprint."""
    path = Path(path)
    pointer = path / POINTER_FILE
    if pointer.is_file() and not (path / "model_index.json").exists():
        try:
            info = json.loads(pointer.read_text())
            return Path(info["target"]), str(info["fingerprint"])
        except (ValueError, KeyError) as e:
            raise ModelError(f"{pointer}: not a valid model pointer ({e})") from e
    return path, None


def fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 over the configs (minus version keys) and safetensors file hashes of a model folder."""
    root, pinned = resolve_model_folder(path)
    if pinned is not None:
        return pinned
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if f.suffix == ".json":
            try:
                obj = json.loads(f.read_text())
            except ValueError as e:
                raise ModelError(f"{f}: invalid JSON ({e})") from e
            if isinstance(obj, dict):
                obj = {k: v for k, v in obj.items() if k not in _VOLATILE_KEYS}
            digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
        elif f.suffix in (".safetensors", ".txt"):
            with open(f, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        else:
            continue
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()[:16]


def _check_folder(root: Path) -> dict[str, str | None]:
    """Check a local folder has every component with safetensors weights; return weight variants."""
    if not (root / "model_index.json").is_file():
        raise ModelError(f"{root}: not a diffusers model folder (no model_index.json)")
    variants: dict[str, str | None] = {}
    for name in COMPONENTS:
        sub = root / name
        if not sub.is_dir():
            raise ModelError(f"{root}: missing component folder '{name}/'")
        if name in WEIGHTED:
            weights = sorted(sub.glob("*.safetensors"))
            if not weights:
                pickles = sorted(p.name for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES)
                what = f"pickle weights only ({', '.join(pickles)})" if pickles else "no weights"
                raise ModelError(
                    f"{sub}: {what}; only .safetensors weights are loaded (convert them first)"
                )
            # A folder holding only e.g. diffusion_pytorch_model.fp16.safetensors is a variant.
            plain = [w for w in weights if len(w.name.split(".")) == 2]
            variants[name] = None if plain else weights[0].name.split(".")[-2]
    return variants


def load_diffusion_model(
    path: str | os.PathLike[str],
    dtype: str = "fp32",
    device: str = "cpu",
    allow_download: bool = False,
) -> DiffusionModel:
    """Load an SD-family diffusers folder (ours, SD-2.1, 2.1-base, 1.5) with safetensors only."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    root, pinned = resolve_model_folder(path)
    local = root.exists()
    if local:
        variants = _check_folder(root)
    elif allow_download:
        variants = dict.fromkeys(WEIGHTED)
    else:
        raise ModelError(
            f"{path}: no such model folder (a hub id is used only with model.allow_download: true)"
        )
    src = str(root) if local else str(path)

    def sub(name: str) -> dict[str, Any]:
        kw: dict[str, Any] = {"local_files_only": local or not allow_download}
        if local:
            return {"pretrained_model_name_or_path": str(root / name), **kw}
        return {"pretrained_model_name_or_path": src, "subfolder": name, **kw}

    try:
        vae = AutoencoderKL.from_pretrained(
            **sub("vae"), use_safetensors=True, torch_dtype=torch_dtype, variant=variants["vae"]
        )
        unet = UNet2DConditionModel.from_pretrained(
            **sub("unet"), use_safetensors=True, torch_dtype=torch_dtype, variant=variants["unet"]
        )
        text_encoder = CLIPTextModel.from_pretrained(
            **sub("text_encoder"),
            use_safetensors=True,
            dtype=torch_dtype,
            variant=variants["text_encoder"],
        )
        tokenizer = CLIPTokenizer.from_pretrained(**sub("tokenizer"))
        # Every SD scheduler config (DDIM, PNDM, ...) carries the betas and prediction type;
        # DDIM is what noising and inversion use here.
        scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(**sub("scheduler")))
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"{src}: cannot load the model: {e}") from e
    fp = fingerprint(root) if local else f"hub:{path}"
    if pinned is not None and fp != pinned:
        raise ModelError(
            f"{path}: the model folder {root} changed since its pointer was written "
            f"(fingerprint {fp}, expected {pinned}); rerun build_model"
        )
    for part in (vae, unet, text_encoder):
        part.requires_grad_(False).eval().to(device)
    return DiffusionModel(vae, unet, text_encoder, tokenizer, scheduler, fp, src)


def encode_prompts(model: DiffusionModel, prompts: list[str]) -> torch.Tensor:
    """Text-encoder last hidden states of `prompts`, padded to 77 tokens: (P, 77, D)."""
    ids = model.tokenizer(
        prompts,
        padding="max_length",
        max_length=model.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(model.text_encoder.device)
    return model.text_encoder(ids)[0]


def encode_images(
    model: DiffusionModel, images: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """VAE latents × scaling_factor of images in [-1, 1]: the posterior mean, or a sample if seeded."""
    dist = model.vae.encode(images.to(model.vae.device, model.vae.dtype)).latent_dist
    latents = dist.mean if generator is None else dist.sample(generator)
    return latents * model.vae.config.scaling_factor


def denoising_target(
    model: DiffusionModel, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should output for noisy latents: ε, or v = α·ε − σ·x0 for v-prediction."""
    kind = model.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return model.scheduler.get_velocity(latents, noise, timesteps)
    raise ModelError(f"{model.source}: unsupported prediction_type {kind!r}")


def predict_x0_eps(
    model: DiffusionModel, sample: torch.Tensor, output: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a UNet output at `timesteps` into (x0, ε) according to the prediction type."""
    alphas = model.scheduler.alphas_cumprod.to(sample.device, torch.float32)[timesteps.cpu()]
    a = alphas.sqrt().view(-1, 1, 1, 1).to(sample.dtype)
    s = (1 - alphas).sqrt().view(-1, 1, 1, 1).to(sample.dtype)
    kind = model.prediction_type
    if kind == "epsilon":
        eps = output
        x0 = (sample - s * eps) / a
    elif kind == "v_prediction":
        x0 = a * sample - s * output
        eps = a * output + s * sample
    else:
        raise ModelError(f"{model.source}: unsupported prediction_type {kind!r}")
    return x0, eps
