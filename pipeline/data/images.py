"""Reading, resizing and writing dataset images and label maps, with clear errors naming the file."""

from __future__ import annotations

import hashlib
import io
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.core.errors import DataError

PathLike = str | os.PathLike[str]


def _open(path: PathLike, sha256: str | None = None) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(
            f"{path}: content differs from the manifest's sha256 {sha256[:12]}... (the file "
            "changed after prepare); rerun prepare"
        )
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now so truncated files fail here, not later
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, zlib.error) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from exc
    return img


def read_image(path: PathLike, sha256: str | None = None) -> np.ndarray:
    """An RGB image as (H, W, 3) uint8; with `sha256`, its file must have that content hash."""
    img = _open(path, sha256)
    if img.mode not in ("RGB", "RGBA", "L", "P", "CMYK", "YCbCr", "I;16", "I"):
        raise DataError(f"{path}: unsupported image mode {img.mode}")
    return np.asarray(img.convert("RGB"))


def read_label(path: PathLike) -> np.ndarray:
    """A single-channel 8-bit label map (ids or palette indices) as (H, W) uint8."""
    img = _open(path)
    if img.mode not in ("L", "P"):
        raise DataError(f"{path}: label must be a single-channel 8-bit PNG, got mode {img.mode}")
    return np.asarray(img)


def read_label_u16(path: PathLike, channel: int = 0) -> np.ndarray:
    """Channel `channel` of a 16-bit label PNG (Synthia's GT/LABELS) as (H, W) uint16.

    Pillow reads 16-bit RGB PNGs only as 8-bit; OpenCV decodes them whole.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataError(f"{path}: unreadable or truncated 16-bit label PNG")
    arr = arr[..., ::-1] if arr.ndim == 3 else arr[..., None]  # BGR(A) -> RGB(A)
    if channel >= arr.shape[-1]:
        raise DataError(f"{path}: channel {channel} requested from a {arr.shape[-1]}-channel PNG")
    return np.ascontiguousarray(arr[..., channel].astype(np.uint16))


def resize(array: np.ndarray, size: Sequence[int], nearest: bool = False) -> np.ndarray:
    """(H, W[, 3]) uint8 resized to `size` (H, W): bilinear for images, nearest for labels."""
    h, w = int(size[0]), int(size[1])
    if array.shape[:2] == (h, w):
        return array
    method = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(array).resize((w, h), method))


def fit_size(height: int, width: int, canvas: Sequence[int]) -> tuple[int, int]:
    """The size an image keeps inside `canvas` (H, W) with its aspect ratio (mmseg keep_ratio)."""
    scale = min(canvas[0] / height, canvas[1] / width)
    return min(int(round(height * scale)), canvas[0]), min(int(round(width * scale)), canvas[1])


def fit(array: np.ndarray, canvas: Sequence[int], nearest: bool = False) -> np.ndarray:
    """`array` resized to fit inside `canvas` with its aspect ratio (bilinear, or nearest)."""
    return resize(array, fit_size(array.shape[0], array.shape[1], canvas), nearest)


def canvas_tensor(image: np.ndarray, canvas: Sequence[int]) -> torch.Tensor:
    """A fitted (h, w, 3) uint8 image as float32 (3, H, W) in [-1, 1], padded bottom and right
    with 0 (mid gray, as mmseg's Pad after DIFF's normalization)."""
    out = torch.zeros(3, int(canvas[0]), int(canvas[1]))
    h, w = image.shape[:2]
    out[:, :h, :w] = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1.0
    return out


def load_image(path: PathLike, canvas: Sequence[int]) -> torch.Tensor:
    """An image fitted to `canvas` (aspect kept, bilinear, padded), float32 (3, H, W)."""
    return canvas_tensor(fit(read_image(path), canvas), canvas)


def load_label(path: PathLike, canvas: Sequence[int]) -> np.ndarray:
    """A train-id label fitted to `canvas` (nearest, padded with 255 = ignore), uint8 (H, W)."""
    fitted = fit(read_label(path), canvas, nearest=True)
    out = np.full((int(canvas[0]), int(canvas[1])), 255, dtype=np.uint8)
    out[: fitted.shape[0], : fitted.shape[1]] = fitted
    return out


def png_bytes(array: np.ndarray, compress_level: int = 1) -> bytes:
    """An (H, W) or (H, W, 3) uint8 array as PNG bytes (deterministic for equal input)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(
        buf, format="PNG", compress_level=compress_level
    )
    return buf.getvalue()


def write_png(path: PathLike, array: np.ndarray, compress_level: int = 1) -> None:
    """Write an (H, W) or (H, W, 3) uint8 array as PNG."""
    Path(path).write_bytes(png_bytes(array, compress_level))


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
