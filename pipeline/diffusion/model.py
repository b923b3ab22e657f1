"""SD-family diffusers folders (the small default and SD-2.1 alike): save, load the parts a stage
uses, fingerprint what the weights compute, and encode images with the VAE."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from pipeline.core.errors import ConfigError, ModelError
from pipeline.core.fileio import atomic_path, write_json
from pipeline.core.fingerprint import (
    FINGERPRINT_FILE,
    POINTER_FILE,
    folder_stats,
    hash_folder,
    read_pointer,
    record,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("vae", "unet", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class DiffusionModel:
    """The parts of an SD-family pipeline a stage loaded, plus the folder's fingerprint."""

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        scheduler: DDIMScheduler,
        vae_config: dict,
        unet_config: dict,
        vae: AutoencoderKL | None = None,
        unet: UNet2DConditionModel | None = None,
        text_encoder: CLIPTextModel | None = None,
        fingerprint: str = "unsaved",
        source: str = "",
        unet_fingerprint: str | None = None,
    ) -> None:
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.vae_config, self.unet_config = dict(vae_config), dict(unet_config)
        self._parts = {"vae": vae, "unet": unet, "text_encoder": text_encoder}
        self.fingerprint, self.source = fingerprint, source
        self._unet_fingerprint = unet_fingerprint

    def _part(self, name: str):
        part = self._parts[name]
        if part is None:
            loaded = [k for k, v in self._parts.items() if v is not None]
            raise ModelError(f"{self.source}: {name} was not loaded (loaded: {loaded})")
        return part

    @property
    def unet_fingerprint(self) -> str:
        """What the UNet computes: the folder's fingerprint, or the folder's and a replacement
        UNet's (model.unet) together. Features and trajectories carry this one; latents and
        prompt embeddings (VAE, text encoder) the folder's."""
        return self._unet_fingerprint or self.fingerprint

    @property
    def vae(self) -> AutoencoderKL:
        return self._part("vae")

    @property
    def unet(self) -> UNet2DConditionModel:
        return self._part("unet")

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self._part("text_encoder")

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    @property
    def device(self) -> torch.device:
        return next(p for p in self._parts.values() if p is not None).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self._parts.values() if p is not None).dtype

    @property
    def vae_stride(self) -> int:
        """Image pixels per latent pixel (8 for SD), from the VAE's config (weights not needed)."""
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def pixel_multiple(self) -> int:
        """What image sides must be a multiple of: the VAE stride times the UNet's halvings."""
        return self.vae_stride * 2 ** (len(self.unet_config["block_out_channels"]) - 1)

    def to(self, device: str | torch.device) -> DiffusionModel:
        """Move every loaded part to `device`."""
        for part in self._parts.values():
            if part is not None:
                part.to(device)
        return self

    def pipeline(self):  # -> diffusers.StableDiffusionPipeline
        """These parts as a diffusers StableDiffusionPipeline (sampling, saving)."""
        # Deferred, and quiet: importing diffusers' pipelines loads transformers' image
        # processors, which warn without torchvision; only saving and sampling need it.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            from diffusers import StableDiffusionPipeline  # noqa: PLC0415
        finally:
            transformers.logging.set_verbosity(verbosity)
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def save_diffusion_model(model: DiffusionModel, path: str | os.PathLike[str]) -> str:
    """Write `model` as a diffusers folder (safetensors) atomically; set and return its fingerprint."""
    path = Path(path)
    with atomic_path(path) as tmp:
        model.pipeline().save_pretrained(tmp, safe_serialization=True)
        # vocab.json + merges.txt too, as in SD's folders (older transformers read only these).
        model.tokenizer.backend_tokenizer.model.save(str(tmp / "tokenizer"))
        record_fingerprint(tmp)
    model.fingerprint = fingerprint(path)
    model.source = str(path)
    return model.fingerprint


def write_pointer(target: str | os.PathLike[str], path: str | os.PathLike[str]) -> str:
    """Check that `target` is a complete model folder, hash it once, write `path`/pointer.json."""
    target = Path(target).resolve()
    if not target.exists():
        raise ModelError(f"{target}: no such model folder (model.source must be a local folder)")
    check_folder(target)
    fp, stats, digests = hash_folder(target)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        write_json(tmp / POINTER_FILE, {"target": str(target), **record(fp, stats, digests)})
    return fp


def is_pointer(path: str | os.PathLike[str]) -> bool:
    """True for a pointer folder (build_model's record of an external model folder)."""
    return read_pointer(Path(path)) is not None


def resolve_model_folder(path: str | os.PathLike[str]) -> Path:
    """The real model folder behind `path` (a pointer folder's target, or `path` itself)."""
    path = Path(path)
    info = read_pointer(path)
    return Path(info["target"]) if info is not None else path


def fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 over the configs (minus version keys) and weight files of a model folder.

    Recorded once (pointer.json with each file's size and mtime, fingerprint.json with its
    size) and re-hashed only when one changed: an SD-2.1 folder is 5 GB of weights.
    """
    path = Path(path)
    info = read_pointer(path)
    if info is not None:
        fp, stats = info["fingerprint"], info["files"]
        root = Path(info["target"])
    else:
        root = path
        rec = root / FINGERPRINT_FILE
        try:
            recorded = json.loads(rec.read_text()) if rec.is_file() else None
        except ValueError:
            recorded = None
        if recorded is None:
            return hash_folder(root)[0]
        fp, stats = recorded["fingerprint"], recorded["files"]
    if folder_stats(root, mtimes=info is not None) == stats:
        return fp
    now = hash_folder(root)[0]
    if info is not None and now != fp:
        raise ModelError(
            f"{path}: the model folder {root} changed since its pointer was written "
            f"(fingerprint {now}, expected {fp}); rerun build_model"
        )
    return now


def check_folder(root: Path) -> dict[str, str | None]:
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
    parts: Sequence[str] = WEIGHTED,
    unet: str | os.PathLike[str] | None = None,
) -> DiffusionModel:
    """Load the `parts` (of vae, unet, text_encoder) of a diffusers folder, safetensors only;
    `unet` replaces its UNet (a diffusers UNet folder or a safetensors state dict: model.unet)."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    unknown = sorted(set(parts) - set(WEIGHTED))
    if unknown:
        raise ModelError(f"unknown model parts {unknown}; expected some of {WEIGHTED}")
    root = resolve_model_folder(path)
    if not root.exists():
        raise ModelError(f"{path}: no such model folder (model.source must be a local folder)")
    variants = check_folder(root)
    torch_dtype = DTYPES[dtype]
    loaders = {
        "vae": lambda kw: AutoencoderKL.from_pretrained(**kw, torch_dtype=torch_dtype),
        "unet": lambda kw: UNet2DConditionModel.from_pretrained(**kw, torch_dtype=torch_dtype),
        "text_encoder": lambda kw: CLIPTextModel.from_pretrained(**kw, dtype=torch_dtype),
    }
    loaded: dict[str, torch.nn.Module] = {}
    try:
        for name in parts:
            kw = {
                "pretrained_model_name_or_path": str(root / name),
                "local_files_only": True,
                "use_safetensors": True,
                "variant": variants[name],
            }
            if name == "unet" and unet is not None:
                part = _replaced_unet(Path(unet), lambda kw=kw: loaders["unet"](kw), torch_dtype)
            else:
                part = loaders[name](kw)
            loaded[name] = part.requires_grad_(False).eval().to(device)
        tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        # Every SD scheduler config (DDIM, PNDM, ...) carries the betas and prediction type;
        # DDIM is what noising and inversion use here.
        scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(str(root / "scheduler")))
        vae_config = AutoencoderKL.load_config(str(root / "vae"))
        unet_config = UNet2DConditionModel.load_config(str(root / "unet"))
        if unet is not None and "unet" in loaded:
            unet_config = dict(loaded["unet"].config)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"{root}: cannot load the model: {e}") from e
    fp = fingerprint(path)
    unet_fp = None
    if unet is not None:
        unet_fp = hashlib.sha256(f"{fp}+unet:{replacement_fingerprint(Path(unet))}".encode())
        unet_fp = unet_fp.hexdigest()[:16]
    return DiffusionModel(
        tokenizer,
        scheduler,
        vae_config,
        unet_config,
        fingerprint=fp,
        source=str(root),
        unet_fingerprint=unet_fp,
        **loaded,
    )


def _replaced_unet(
    path: Path, load_base: Callable[[], UNet2DConditionModel], dtype: torch.dtype
) -> UNet2DConditionModel:
    # A folder is loaded as diffusers does; a file is a state dict for the folder's own UNet
    # (CleanDIFT ships cleandift_sd21_unet.safetensors so: its README, strict=True).
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a diffusers UNet folder (no config.json)")
        check_unet_file(path, None)  # its config and weights' header agree
        return UNet2DConditionModel.from_pretrained(
            str(path), local_files_only=True, use_safetensors=True, torch_dtype=dtype
        )
    if path.suffix != ".safetensors" or not path.is_file():
        raise ModelError(f"{path}: model.unet must be a UNet folder or a .safetensors file")
    try:
        state = safetensors.torch.load_file(str(path))
    except (OSError, safetensors.SafetensorError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from e
    base = load_base()
    check_unet_file(path, base)  # one line naming a mismatch, as check_params gives it
    try:
        base.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:3]
        raise ModelError(
            f"{path}: not a UNet of this model's architecture: {' '.join(first)}"
        ) from e
    return base


def check_unet_file(path: Path, unet: torch.nn.Module | None) -> None:
    """model.unet against the model's UNet `unet` (weightless: the meta device will do), from
    headers only: a state-dict file's tensor names and shapes; a UNet folder's config and its
    weights' header against the architecture that config builds (`unet` unused). One
    ConfigError, no weights read."""
    if path.is_dir():
        try:
            config = UNet2DConditionModel.load_config(str(path))
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(config)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"model.unet {path}: unreadable UNet config.json ({e})") from None
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise ConfigError(
                f"model.unet {path}: expected one .safetensors weights file, found {len(files)}"
            )
        path = files[0]
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (OSError, safetensors.SafetensorError) as e:
        raise ConfigError(f"model.unet {path}: not a readable safetensors file ({e})") from None
    want = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    wrong = sorted(k for k in set(want) & set(shapes) if want[k] != shapes[k])
    missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    if wrong or missing or extra:
        first = (wrong or missing or extra)[0]
        raise ConfigError(
            f"model.unet {path}: not a UNet of this model's architecture ({len(wrong)} tensors "
            f"of other shapes, {len(missing)} missing, {len(extra)} unknown; e.g. {first}: "
            f"{shapes.get(first)} where the UNet has {want.get(first)})"
        )


def replacement_fingerprint(path: Path) -> str:
    """The fingerprint of a replacement UNet: a folder's (recorded like a model folder's), or
    a file's sha256."""
    if path.is_dir():
        return fingerprint(path)
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:16]


def load_architecture(path: str | os.PathLike[str]) -> DiffusionModel:
    """A folder's configs, tokenizer and scheduler with a weightless UNet (on the meta device):
    enough to check taps, strides, sizes and timesteps before any stage runs."""
    root = resolve_model_folder(path)
    check_folder(root)
    try:
        unet_config = UNet2DConditionModel.load_config(str(root / "unet"))
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
        return DiffusionModel(
            CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True),
            DDIMScheduler.from_config(DDIMScheduler.load_config(str(root / "scheduler"))),
            AutoencoderKL.load_config(str(root / "vae")),
            unet_config,
            unet=unet,
            source=str(root),
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{root}: cannot read the model's configs: {e}") from e


# ---- fingerprints ---------------------------------------------------------------------


def record_fingerprint(root: Path) -> None:
    write_json(root / FINGERPRINT_FILE, record(*hash_folder(root, mtimes=False)))
