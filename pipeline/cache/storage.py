"""Storage modes of the feature store: fp16, per-channel int8, PCA to k channels, and PCA to k
channels stored as int8 (docs/store.md)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch
from sklearn.decomposition import IncrementalPCA
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from pipeline.core.errors import StoreError

# Every storage mode (`extract.storage`), with how a standard reader turns a tap's stored
# `values` into features (written as each tap group's `decode` attribute): the one place a mode
# is declared. The PCA modes are written pca-<k> and pca-<k>-int8.
MODES = {
    "fp16": "values",
    "int8": "values * scales[..., None, None]",
    "pca": "features = einsum('kc,...khw->...chw', components, values) + mean (approximately)",
    "pca-int8": "coefficients = values * scales[..., None, None]; features as pca (approximately)",
}


@dataclasses.dataclass(frozen=True)
class StorageMode:
    """A parsed storage mode: kind fp16 | int8 | pca (with k components, optionally int8)."""

    kind: str
    k: int = 0
    int8: bool = False  # pca only: the k coefficients stored as per-channel int8

    @property
    def decode(self) -> str:
        """How a standard reader decodes this mode's values (MODES)."""
        return MODES["pca-int8" if self.int8 else self.kind]

    @property
    def quantized(self) -> bool:
        """Values stored as int8 with per-channel scales."""
        return self.kind == "int8" or self.int8

    @property
    def dtype(self) -> np.dtype:
        """The on-disk dtype of the feature arrays."""
        return np.dtype(np.int8) if self.quantized else np.dtype(np.float16)


def parse_storage(mode: str) -> StorageMode:
    """A mode of MODES, the PCA ones with their k: 'fp16', 'int8', 'pca-64', 'pca-64-int8'."""
    m = re.fullmatch(r"pca-(\d+)(-int8)?", mode)
    if m and int(m.group(1)) > 0:
        return StorageMode("pca", int(m.group(1)), bool(m.group(2)))
    if mode in MODES and not mode.startswith("pca"):
        return StorageMode(mode)
    written = [m.replace("pca", "pca-<k>") for m in MODES]
    raise StoreError(f"unknown storage mode {mode!r}: expected one of {written}")


# Chunk compressors by name (extract.compression). Measured on the default's real features
# (benchmarks/store_io.py): every mode keeps >= 0.89 of its bytes under the best of them, while
# decoding costs one core 0.4-1.6 GB/s, below a GPU host's NVMe; so `none` is the default.
COMPRESSIONS = ("none", "lz4", "zstd")


def chunk_codecs(compression: str, checksum: bool = True) -> list[BytesBytesCodec]:
    """A chunk's bytes-to-bytes codecs: the compressor, then crc32c (checked on every read);
    `checksum=False` only to measure what the checksum costs."""
    codecs: dict[str, list[BytesBytesCodec]] = {
        "none": [],
        "lz4": [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
        "zstd": [ZstdCodec(level=1)],
    }
    if compression not in codecs:
        raise StoreError(f"unknown compression {compression!r}: expected one of {COMPRESSIONS}")
    return codecs[compression] + ([Crc32cCodec()] if checksum else [])


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-(image, channel) int8: x ~ q * scale; returns q (B,C,h,w), scale (B,C)."""
    amax = x.detach().abs().amax(dim=(-2, -1)).float()
    scale = amax / 127.0
    q = torch.round(x.float() / scale.clamp_min(1e-30)[..., None, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of quantize_int8 for one image: q (C,h,w), scale (C,) -> float32 (the reader's)."""
    return q.astype(np.float32) * scale.astype(np.float32)[:, None, None]


def project_pca(x: torch.Tensor, components: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(B,C,h,w) -> (B,k,h,w) in the PCA basis, computed where x lives (the device)."""
    comp = components.to(device=x.device, dtype=torch.float32)
    mu = mean.to(device=x.device, dtype=torch.float32)
    return torch.einsum("kc,bchw->bkhw", comp, x.float() - mu[None, :, None, None])


def sample_pixels(x: torch.Tensor, n: int, generator: torch.Generator) -> np.ndarray:
    """n feature vectors (n, C) drawn without replacement from the pixels of x (B,C,h,w)."""
    flat = x.detach().float().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    idx = torch.randperm(flat.shape[0], generator=generator)[: min(n, flat.shape[0])]
    return flat[idx.to(flat.device)].cpu().numpy()


def fit_pca(pixels: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """IncrementalPCA on (n, C) pixels; k is capped at C. Returns components (k,C), mean (C,)."""
    n, c = pixels.shape
    k = min(k, c)
    if n < k:
        raise StoreError(f"PCA needs at least {k} sample pixels, got {n}")
    batch = max(batch_size, k)
    ipca = IncrementalPCA(n_components=k, batch_size=batch)
    for start in range(0, n, batch):
        chunk = pixels[start : start + batch]
        if chunk.shape[0] < k:  # IncrementalPCA rejects batches smaller than k
            break
        ipca.partial_fit(chunk.astype(np.float64))
    return ipca.components_.astype(np.float32), ipca.mean_.astype(np.float32)


def reduce_features(
    x: torch.Tensor,
    mode: StorageMode,
    projection: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply a storage mode on the device: returns (values in storage dtype, int8 scales|None)."""
    if mode.kind == "fp16":
        return x.to(torch.float16), None
    if mode.kind == "int8":
        return quantize_int8(x)
    if projection is None:
        raise StoreError("PCA storage needs a projection")
    y = project_pca(x, *projection)
    return quantize_int8(y) if mode.int8 else (y.to(torch.float16), None)


def as_read(
    x: torch.Tensor,
    mode: StorageMode,
    projection: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Features x (B,C,h,w) as a reader returns them after storage, as float32, differentiably.

    fp16 and PCA: the values the store holds (their casts keep the gradient); int8: the
    de-quantised values, with a straight-through gradient since rounding has none.
    """
    values, scales = reduce_features(x, mode, projection)
    if not mode.quantized:
        return values.float()
    decoded = values.float() * scales[..., None, None]
    exact = x.float() if mode.kind == "int8" else project_pca(x, *projection)
    return exact + (decoded - exact).detach()
