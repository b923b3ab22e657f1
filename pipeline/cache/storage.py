"""Storage modes of the feature store: fp16, per-channel int8, PCA to k channels, and PCA to k
channels stored as int8 (docs/store.md)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np
import torch
from sklearn.decomposition import IncrementalPCA
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from pipeline.core.errors import ConfigError, StoreError
from pipeline.data.samples import Feature, Quantized

Projection = tuple[torch.Tensor, torch.Tensor]  # PCA components (k, C), mean (C,)


@dataclasses.dataclass(frozen=True)
class Part:
    """An array a mode stores per image-variant beside `values` (its shape after the tap axis;
    `all_variants`: one chunk holds an image's every variant, as the part is small)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    dims: tuple[str, ...]
    all_variants: bool = True


class StorageMode:
    """One storage mode (`extract.storage`): what a store of it holds per tap (its `values`
    dtype and width, the other arrays), how features become those arrays on the device and
    how a reader turns them back; every mode is one class below and one entry of MODES."""

    name: str = ""
    dtype: np.dtype = np.dtype(np.float16)  # of `values`
    decode: str = "values"  # how a standard reader decodes a tap group (its attribute)

    def stored_channels(self, channels: int) -> int:
        """The width `values` holds for a tap of `channels`."""
        return channels

    def parts(self, channels: int) -> dict[str, Part]:
        """The arrays beside `values` per image-variant, for a stored width `channels`."""
        return {}

    def fixed(self, taps: int, model_channels: int) -> dict[str, Part]:
        """The arrays a tap group holds once, not per image (a projection's)."""
        return {}

    def check_widths(self, widths: dict[str, int]) -> None:
        """Refuse, naming the taps, widths this mode cannot store."""

    def fit(self, sample: Callable[[], dict[str, np.ndarray]]) -> dict[str, Projection] | None:
        """What the mode fits on a pixel sample of the features (drawn only if it needs one),
        per tap; None: nothing."""
        return None

    def reduce(self, x: torch.Tensor, projection: Projection | None) -> dict[str, torch.Tensor]:
        """Features (B, C, h, w) as stored, computed on the device: `values` and the parts."""
        return {"values": x.to(torch.float16)}

    def as_read(self, x: torch.Tensor, projection: Projection | None) -> torch.Tensor:
        """Features (B, C, h, w) as a reader returns them after storage, float32,
        differentiably (a rounding passes the gradient straight through)."""
        return self.reduce(x, projection)["values"].float()

    def decode_parts(self, values: np.ndarray, parts: dict[str, np.ndarray]) -> np.ndarray:
        """One tap's stored arrays (C, h, w) as float32 features (the reader's `read`)."""
        return values.astype(np.float32)

    def feature(self, values: torch.Tensor, parts: dict[str, torch.Tensor]) -> Feature:
        """One tap's stored arrays as they travel to the device (decoded there: to_device)."""
        return values

    def fixed_data(self, projections: list[Projection | None]) -> dict[str, np.ndarray]:
        """The `fixed` arrays' values for a group's taps, from their projections."""
        return {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorageMode) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"StorageMode({self.name!r})"


class Fp16(StorageMode):
    name, dtype = "fp16", np.dtype(np.float16)


class Int8(StorageMode):
    """Per-(image, channel) symmetric int8 with float32 scales, decoded on the device."""

    name, dtype, decode = "int8", np.dtype(np.int8), "values * scales[..., None, None]"

    def parts(self, channels: int) -> dict[str, Part]:
        return {"scales": Part((channels,), np.dtype(np.float32), ("channel",))}

    def reduce(self, x: torch.Tensor, projection: Projection | None) -> dict[str, torch.Tensor]:
        q, scales = quantize_int8(x)
        return {"values": q, "scales": scales}

    def as_read(self, x: torch.Tensor, projection: Projection | None) -> torch.Tensor:
        stored = self.reduce(x, projection)
        decoded = stored["values"].float() * stored["scales"][..., None, None]
        return x.float() + (decoded - x.float()).detach()

    def decode_parts(self, values: np.ndarray, parts: dict[str, np.ndarray]) -> np.ndarray:
        return dequantize_int8(values, parts["scales"])

    def feature(self, values: torch.Tensor, parts: dict[str, torch.Tensor]) -> Feature:
        return Quantized(values, parts["scales"])


@dataclasses.dataclass(frozen=True, eq=False)
class Pca(StorageMode):
    """k principal components per tap (fitted on a pixel sample of the source, stored with the
    store), their coefficients stored as `inner` stores a tap (fp16 or int8): what the fusion
    reads, never reconstructed to full width."""

    k: int
    inner: StorageMode

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"pca-{self.k}" + ("" if isinstance(self.inner, Fp16) else f"-{self.inner.name}")

    @property
    def dtype(self) -> np.dtype:  # type: ignore[override]
        return self.inner.dtype

    @property
    def decode(self) -> str:  # type: ignore[override]
        inner = "values" if isinstance(self.inner, Fp16) else self.inner.decode
        return (
            f"coefficients = {inner}; features = einsum('kc,...khw->...chw', components, "
            "coefficients) + mean (approximately)"
        )

    def stored_channels(self, channels: int) -> int:
        return self.k

    def parts(self, channels: int) -> dict[str, Part]:
        return self.inner.parts(channels)

    def fixed(self, taps: int, model_channels: int) -> dict[str, Part]:
        f32 = np.dtype(np.float32)
        return {
            "components": Part(
                (taps, self.k, model_channels), f32, ("tap", "channel", "model_channel")
            ),
            "mean": Part((taps, model_channels), f32, ("tap", "model_channel")),
        }

    def check_widths(self, widths: dict[str, int]) -> None:
        narrow = sorted(f"{name} ({c})" for name, c in widths.items() if c <= self.k)
        if narrow:
            raise ConfigError(
                f"extract.storage {self.name}: keeps at least as many channels as taps "
                f"{', '.join(narrow)} have; choose k below the smallest tap width"
            )

    def fixed_data(self, projections: list[Projection | None]) -> dict[str, np.ndarray]:
        if any(p is None for p in projections):
            raise StoreError(f"storage {self.name} needs a projection for every tap")
        return {
            "components": np.stack([np.asarray(c, np.float32) for c, _ in projections]),  # type: ignore[misc]
            "mean": np.stack([np.asarray(m, np.float32) for _, m in projections]),  # type: ignore[misc]
        }

    def fit(self, sample: Callable[[], dict[str, np.ndarray]]) -> dict[str, Projection]:
        return {
            name: tuple(map(torch.from_numpy, fit_pca(pixels, self.k)))  # type: ignore[misc]
            for name, pixels in sample().items()
        }

    def reduce(self, x: torch.Tensor, projection: Projection | None) -> dict[str, torch.Tensor]:
        return self.inner.reduce(self._project(x, projection), None)

    def as_read(self, x: torch.Tensor, projection: Projection | None) -> torch.Tensor:
        return self.inner.as_read(self._project(x, projection), None)

    def decode_parts(self, values: np.ndarray, parts: dict[str, np.ndarray]) -> np.ndarray:
        return self.inner.decode_parts(values, parts)  # the coefficients

    def feature(self, values: torch.Tensor, parts: dict[str, torch.Tensor]) -> Feature:
        return self.inner.feature(values, parts)

    @staticmethod
    def _project(x: torch.Tensor, projection: Projection | None) -> torch.Tensor:
        if projection is None:
            raise StoreError("PCA storage needs a projection")
        return project_pca(x, *projection)


# Every storage mode (`extract.storage`), the one place a mode is declared: a name, or a
# pattern with its parameters (pca-<k>, pca-<k>-int8), and the mode it makes.
MODES: dict[str, Callable[..., StorageMode]] = {
    "fp16": Fp16,
    "int8": Int8,
    "pca-<k>": lambda k: Pca(k, Fp16()),
    "pca-<k>-int8": lambda k: Pca(k, Int8()),
}


def parse_storage(mode: str) -> StorageMode:
    """The mode `mode` names: 'fp16', 'int8', 'pca-64', 'pca-64-int8' (MODES)."""
    for name, make in MODES.items():
        pattern = re.escape(name).replace(re.escape("<k>"), r"([1-9][0-9]*)")
        m = re.fullmatch(pattern, mode)
        if m:
            return make(*(int(g) for g in m.groups()))
    raise StoreError(f"unknown storage mode {mode!r}: expected one of {list(MODES)}")


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
